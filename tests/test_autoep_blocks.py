"""The families' blocks on DeepSpeed's AutoEP, in one process (ep = 1): DeepSpeed's own conversion of the model's
block (shared experts and their gate, sigmoid scores with a non-zero score bias, group-limited top-k, a routed scale,
top-k renormalised or not) computes what the block computes, and its tensors map back to the block's names.
Multi-rank parity (dp2 x ep2 against one rank) is tests/test_family_training.py's."""

import copy

import pytest
import torch

from benchmarks.memory_accuracy import GLM_LIKE, QWEN2_MOE_LIKE, convert_to_autoep
from moe_model import MoEConfig, MoEForCausalLM
from moe_model.parallel.autoep import block_state
from moe_model.recipe import load_recipe
from tests.conftest import ROOT

BLOCKS = {
    "glm": GLM_LIKE,  # shared expert, sigmoid, groups (2, 1 kept), score bias, scale 2.5, per-sequence aux
    "glm gated shared, not renormalised": {**GLM_LIKE, "shared_expert_gate": True, "norm_topk_prob": False},
    "qwen2_moe": QWEN2_MOE_LIKE,  # softmax, gated shared expert, top-k not renormalised
}


def with_score_bias(config: dict) -> MoEForCausalLM:
    torch.manual_seed(0)
    model = MoEForCausalLM(MoEConfig(**config))
    for name, bias in model.named_buffers():  # zeros at init: made to choose
        if name.endswith("e_score_correction_bias"):
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    return model


@pytest.mark.parametrize("name", list(BLOCKS))
def test_autoeps_conversion_computes_the_block(name):
    block = with_score_bias(BLOCKS[name])
    converted = copy.deepcopy(block)
    convert_to_autoep(converted)
    assert any("mlp.moe.router." in n for n, _ in converted.named_parameters())  # DeepSpeed's layer runs
    ids = torch.randint(0, block.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    a, b = block(input_ids=ids, labels=ids), converted(input_ids=ids, labels=ids)
    assert torch.equal(a.expert_counts_LE, b.expert_counts_LE)
    assert (a.logits - b.logits).abs().max() <= 1e-5
    for key in ("loss", "aux_loss"):
        assert abs(a[key].item() - b[key].item()) <= 1e-6 * abs(a[key].item()), key
    a.loss.backward()
    b.loss.backward()
    grads = dict(converted.named_parameters())
    for part in ("shared_experts.down_proj.weight", "self_attn.q_proj.weight"):
        mine = block.get_parameter(f"model.layers.1.mlp.{part}" if "shared" in part else f"model.layers.1.{part}")
        theirs = grads[f"model.layers.1.mlp.moe.{part}" if "shared" in part else f"model.layers.1.{part}"]
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-4, atol=1e-7), part


@pytest.mark.parametrize("name", list(BLOCKS))
def test_autoeps_tensors_map_back_to_the_blocks_names(name):
    """`block_state` (export, resuming on another backend) gives every parameter and the score bias back under the
    block's name, equal."""
    block = with_score_bias(BLOCKS[name])
    converted = copy.deepcopy(block)
    convert_to_autoep(converted)
    mapped = block_state(converted.state_dict())
    original = block.state_dict()
    assert set(mapped) == set(original)
    for key, tensor in original.items():
        assert torch.equal(mapped[key], tensor), key


def test_auto_runs_the_families_blocks_on_autoep_where_ep_exceeds_one():
    for recipe in ("tiny_glm4_moe", "tiny_qwen2_moe"):
        strategy = load_recipe(ROOT / f"recipes/{recipe}.yaml").strategy(4)[0]
        assert (strategy.ep, strategy.moe_backend) == (2, "autoep"), (recipe, strategy)
