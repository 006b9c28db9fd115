"""The model against transformers' own Mixtral: parameter set, logits, router loss."""

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moe_model import MoEConfig, MoEForCausalLM

MIXTRAL_8X7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)


def mixtral_config(**shape) -> MixtralConfig:
    rope_theta = shape.pop("rope_theta", 10000.0)
    shape.pop("max_position_embeddings", None)
    return MixtralConfig(**shape, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                         sliding_window=None, rms_norm_eps=1e-5, max_position_embeddings=64,
                         attn_implementation="eager")


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_count_equals_mixtral_8x7b_on_meta():
    with torch.device("meta"):
        ours = MoEForCausalLM(MoEConfig(**MIXTRAL_8X7B, hidden_act="silu"))
        theirs = MixtralForCausalLM(mixtral_config(**MIXTRAL_8X7B))
    assert numel(ours) == numel(theirs) == 46_702_792_704


def test_silu_parameter_names_and_shapes_are_mixtrals(tiny_config_kwargs):
    ours = MoEForCausalLM(MoEConfig(**tiny_config_kwargs, hidden_act="silu"))
    theirs = MixtralForCausalLM(mixtral_config(**tiny_config_kwargs))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def copy_into_mixtral(ours: MoEForCausalLM, kwargs) -> MixtralForCausalLM:
    theirs = MixtralForCausalLM(mixtral_config(**kwargs)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs


@pytest.mark.parametrize("rope_theta", [10000.0, 1e6])
def test_logits_equal_mixtral_with_copied_weights(tiny_config_kwargs, rope_theta):
    torch.manual_seed(0)
    kwargs = dict(tiny_config_kwargs, rope_theta=rope_theta)
    ours = MoEForCausalLM(MoEConfig(**kwargs, hidden_act="silu", initializer_range=0.2)).eval()
    theirs = copy_into_mixtral(ours, kwargs)
    ids = torch.randint(0, kwargs["vocab_size"], (3, 17))
    with torch.no_grad():
        a = ours(ids).logits
        b = theirs(ids).logits
    assert (a - b).abs().max().item() < 1e-5


def test_aux_loss_is_mixtrals_per_layer_divided_by_k(tiny_config_kwargs):
    torch.manual_seed(1)
    ours = MoEForCausalLM(MoEConfig(**tiny_config_kwargs, hidden_act="silu", initializer_range=0.2)).eval()
    ids = torch.randint(0, tiny_config_kwargs["vocab_size"], (2, 11))
    with torch.no_grad():
        out = ours(ids, output_router_logits=True)
    k, e = tiny_config_kwargs["num_experts_per_tok"], tiny_config_kwargs["num_local_experts"]
    per_layer = [load_balancing_loss_func((logits,), e, k) / k for logits in out.router_logits]
    reference = sum(per_layer) / len(per_layer)
    assert torch.allclose(out.aux_loss, reference, rtol=1e-6)


def test_training_loss_adds_coefficients(tiny_config_kwargs):
    torch.manual_seed(2)
    cfg = MoEConfig(**tiny_config_kwargs, router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    out = MoEForCausalLM(cfg)(ids, labels=ids)
    expected = out.lm_loss + 0.1 * out.aux_loss + 0.01 * out.z_loss
    assert torch.allclose(out.loss, expected)
    reference_lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.lm_loss, reference_lm)
