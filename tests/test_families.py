"""The MoE families as configurations of the same blocks (issue 25), each against transformers' own class for it.

Per family (Qwen3-MoE, Qwen2-MoE, OLMoE, GLM-4.5-MoE), at a tiny shape with random weights that uses every feature
the family has (dense layers, shared experts and their gate, q/k norm per head or over the projection, q/k/v bias,
clip_qkv, partial rotary, sigmoid group-limited routing with a non-zero score bias, routed scaling):
- `formats.family_config` maps transformers' config onto `MoEConfig`, and the family's weights load into
  `MoEForCausalLM` under the names `formats.from_family_names` gives; its logits and its loss equal transformers'
  on the same batch (fp32, eager attention on both sides);
- the way back (`formats.to_family`) gives transformers' config and every tensor bit for bit, and a Hub folder
  transformers saved (one tensor per expert on disk) reads in and writes back to the same tensors;
- a family feature the model cannot compute (a sliding window) is refused by name.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from moe_model import formats
from moe_model.modeling import MoEForCausalLM

COMMON = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, num_experts_per_tok=2, initializer_range=0.2)
FAMILIES = {  # model_type -> (config class, model class, kwargs)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        COMMON, num_hidden_layers=4, intermediate_size=96, moe_intermediate_size=32, num_experts=8, head_dim=32,
        norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[3], attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, router_aux_loss_coef=0.001)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, norm_topk_prob=False, mlp_only_layers=[2],
        qkv_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, router_aux_loss_coef=0.001)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        COMMON, num_hidden_layers=2, intermediate_size=32, num_experts=8, clip_qkv=0.5, norm_topk_prob=False,
        pad_token_id=1, eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        router_aux_loss_coef=0.01)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, use_qk_norm=True, attention_bias=True, head_dim=32, partial_rotary_factor=0.5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # multi-head latent attention (q through its low rank, interleaved RoPE) under GLM's routed block
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        COMMON, num_key_value_heads=4, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=8, n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, rope_interleave=True, num_mtp_layers=0,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
}


def family_model(name: str, **changes):
    """transformers' own model of the family, random weights (seeded), eager attention; GLM's score bias non-zero
    (random, as a trained one is), so that it moves the choice of experts."""
    config_class, model_class, kwargs = FAMILIES[name]
    config = getattr(transformers, config_class)(**{**kwargs, **changes})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for module_name, buffer in model.named_buffers():
            if module_name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.5)
    return model


def ours_from(family) -> MoEForCausalLM:
    config = formats.family_config(family.config)
    config._attn_implementation = "eager"
    model = MoEForCausalLM(config).eval()
    model.load_state_dict(formats.from_family_names(family.config.model_type, family.state_dict()), strict=True)
    return model


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return family_model(request.param)


def batch():
    torch.manual_seed(1)
    return torch.randint(0, COMMON["vocab_size"], (2, 12))


def test_the_logits_and_the_loss_equal_transformers(family):
    model = ours_from(family)
    ids = batch()
    with torch.no_grad():
        theirs = family(input_ids=ids, labels=ids)  # no router logits asked: the loss is the cross-entropy alone
        mine = model(input_ids=ids, labels=ids)
    assert (mine.logits - theirs.logits).abs().max() <= 1e-5
    assert abs(mine.lm_loss.item() - theirs.loss.item()) <= 1e-5
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["MoESparseBlock" if hasattr(layer.mlp, "experts") else "MoEMLP"  # their MoE blocks hold experts
                     for layer in family.model.layers], kinds


def test_the_way_back_gives_the_config_and_every_tensor_bit_for_bit(family):
    model = ours_from(family)
    kind = family.config.model_type
    config, state = formats.to_family(model.config, model.state_dict(), kind)
    assert type(config) is type(family.config)
    rebuilt = type(family)(config)
    rebuilt.load_state_dict(state, strict=True)
    theirs = family.state_dict()
    assert set(rebuilt.state_dict()) == set(theirs)
    for name, tensor in rebuilt.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    for field in formats.FAMILY_FIELDS[kind]:
        assert getattr(config, field) == getattr(family.config, field), field


def test_a_hub_folder_reads_in_and_writes_back_bit_for_bit(family, tmp_path):
    family.save_pretrained(tmp_path / "hub")  # transformers' Hub layout: one tensor per expert on disk
    model = formats.load_family(tmp_path / "hub")
    formats.save_family(model, tmp_path / "back", family.config.model_type)
    back = type(family).from_pretrained(tmp_path / "back")
    theirs = family.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("name, changes, words", [
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 4}, "sliding_window"),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}, "sliding_window"),
])
def test_a_feature_the_model_cannot_compute_is_refused_by_name(name, changes, words):
    family = family_model(name, **changes)
    with pytest.raises(ValueError, match=words):
        formats.family_config(family.config)


def test_a_native_folder_with_family_blocks_becomes_the_same_config_through_a_recipe(tmp_path):
    from moe_model import MoEConfig
    from moe_model.recipe import ModelSection

    config = MoEConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=3,
                       num_attention_heads=4, num_local_experts=4, moe_intermediate_size=16, num_shared_experts=1,
                       shared_expert_gate=True, dense_layers=[0], qk_norm="head", attention_bias=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})
    config.save_pretrained(tmp_path / "native")
    again = ModelSection(**formats.model_fields(tmp_path / "native")).to_config()
    for name in formats.ARCHITECTURE[:-1]:
        assert getattr(again, name) == getattr(config, name), name
    assert again.rope_parameters == config.rope_parameters


def test_each_family_folder_becomes_its_config_through_a_recipe(family, tmp_path):
    from moe_model.recipe import ModelSection

    family.save_pretrained(tmp_path / "hub")
    expected = formats.family_config(family.config)
    again = ModelSection(**formats.model_fields(tmp_path / "hub")).to_config()
    for name in formats.ARCHITECTURE[:-1] + ("router_aux_loss_coef",):
        assert getattr(again, name) == getattr(expected, name), name
    assert again.rope_parameters.get("partial_rotary_factor", 1.0) == \
        expected.rope_parameters.get("partial_rotary_factor", 1.0)


# The Hub config.json values of the models the issue names (the shape fields only; no download here), the way
# transformers' own classes read them
REAL_SIZE = {
    "Qwen3-30B-A3B": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, max_position_embeddings=40960, tie_word_embeddings=False, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, router_aux_loss_coef=0.001)),
    "Qwen3-235B-A22B": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960, tie_word_embeddings=False,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "Qwen1.5-MoE-A2.7B": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        num_experts=60, num_experts_per_tok=4, max_position_embeddings=8192, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "OLMoE-1B-7B": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096)),
    "GLM-4.5-Air": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        vocab_size=151552, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=46, num_attention_heads=96, num_key_value_heads=8, head_dim=128, n_routed_experts=128,
        n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=1, attention_bias=True, use_qk_norm=False,
        partial_rotary_factor=0.5, n_group=1, topk_group=1, routed_scaling_factor=1.0, max_position_embeddings=131072,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                    "partial_rotary_factor": 0.5})),
    # multi-head latent attention (issue 26): the shape fields of each model's config.json as published
    "DeepSeek-V3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
        n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
        first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=163840, num_mtp_layers=0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0})),
    "Moonlight-16B-A3B": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
        n_routed_experts=64, routed_scaling_factor=2.446, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, n_group=1, topk_group=1, num_experts_per_tok=6,
        first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=8192, num_mtp_layers=0,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0})),
    "Kimi-K2": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=64, num_key_value_heads=64, n_shared_experts=1,
        n_routed_experts=384, routed_scaling_factor=2.827, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
        v_head_dim=128, qk_nope_head_dim=128, n_group=1, topk_group=1, num_experts_per_tok=8,
        first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=131072, num_mtp_layers=0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 1.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0})),
}
# the recipes of recipes/ that state these models at real size
SHIPPED = {"Qwen3-30B-A3B": "qwen3_30b_a3b", "Qwen3-235B-A22B": "qwen3_235b_a22b",
           "Qwen1.5-MoE-A2.7B": "qwen1_5_moe_a2_7b", "OLMoE-1B-7B": "olmoe_1b_7b", "GLM-4.5-Air": "glm4_5_air",
           "DeepSeek-V3": "deepseek_v3", "Moonlight-16B-A3B": "moonlight_16b_a3b"}


@pytest.mark.parametrize("name", list(REAL_SIZE))
def test_the_parameter_count_at_real_size_is_transformers_numel(name):
    """`count_params` (estimate/params.py over `shapes.layer_table`) against the numel of transformers' own class
    for the family, built on the meta device (no memory), and of this model built from the mapped config."""
    from moe_model.estimate import count_params

    config_class, model_class, kwargs = REAL_SIZE[name]
    config = getattr(transformers, config_class)(**kwargs)
    with torch.device("meta"):
        theirs = sum(p.numel() for p in getattr(transformers, model_class)(config).parameters())
        ours_config = formats.family_config(config)
        ours = sum(p.numel() for p in MoEForCausalLM(ours_config).parameters())
    assert count_params(ours_config).total == theirs == ours


@pytest.mark.parametrize("name", list(SHIPPED))
def test_each_shipped_real_size_recipe_is_the_hub_model(name):
    """recipes/<model>.yaml states the Hub model's config.json: every shape and block field equal to transformers'
    config mapped by `formats.family_config`, so `moe params`, `moe estimate` and `moe plan` answer for the model on
    the Hub (its parameter count is then transformers' numel, the test above)."""
    from moe_model.estimate import count_params
    from moe_model.recipe import load_recipe
    from tests.conftest import ROOT

    config_class, model_class, kwargs = REAL_SIZE[name]
    hub = formats.family_config(getattr(transformers, config_class)(**kwargs))
    shipped = load_recipe(ROOT / f"recipes/{SHIPPED[name]}.yaml").moe_config()
    for field in formats.ARCHITECTURE[:-1] + ("router_aux_loss_coef", "max_position_embeddings"):
        assert getattr(shipped, field) == pytest.approx(getattr(hub, field)), field
    assert shipped.rope_parameters == hub.rope_parameters
    assert count_params(shipped).total == count_params(hub).total


@pytest.mark.parametrize("kind, words", [
    ("mixtral", "mixtral cannot hold num_shared_experts 1, shared_expert_gate True"),
    ("qwen3_moe", "a qwen3_moe model cannot hold this config: qk_norm None"),
    ("olmoe", "a olmoe model cannot hold this config"),
])
def test_an_export_format_that_cannot_hold_the_blocks_is_one_line(tmp_path, kind, words):
    import json

    from moe_model import MoEConfig
    from moe_model.train.export import ExportError, _checked_format

    run = tmp_path / "run.json"
    run.write_text(json.dumps({"recipe": {"train": {}}}))
    config = MoEConfig(hidden_act="silu", num_shared_experts=1, shared_expert_gate=True)
    with pytest.raises(ExportError, match=words):
        _checked_format(kind, config, run)
    assert _checked_format("native", config, run) == "native"
    with pytest.raises(ExportError, match="hub writes the format of the run's train.init_from folder, and this run "
                                          "has none"):
        _checked_format("hub", config, run)
