"""Multi-head latent attention (issue 26, first part) against transformers' own `DeepseekV3ForCausalLM`: the
variants its checkpoints use (q through a low rank or not, interleaved RoPE or by halves, YaRN with its softmax
mscale), generation through the compressed cache, and the refusals where the project does not carry MLA yet.
The family's round trips and its parameter counts at real size are tests/test_families.py's."""

import json

import pytest
import torch

from moe_model import MoEConfig
from moe_model.recipe import RecipeError, load_recipe
from tests.conftest import ROOT
from tests.test_families import batch, family_model, ours_from

YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.mark.parametrize("changes", [
    {},  # q through its rank, interleaved RoPE
    {"q_lora_rank": None, "rope_interleave": False},  # Moonlight's plain q, RoPE by halves
    {"rope_parameters": YARN},  # DeepSeek-V3's YaRN: the softmax scale times mscale^2
    {"attention_bias": True},  # biases on q_a, kv_a and o
], ids=["q-rank-interleaved", "plain-q-halves", "yarn-mscale", "bias"])
def test_mla_logits_equal_transformers(changes):
    family = family_model("deepseek_v3", **changes)
    model = ours_from(family)
    ids = batch()
    with torch.no_grad():
        theirs, mine = family(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)
    assert (mine.logits - theirs.logits).abs().max() <= 1e-5
    assert abs(mine.lm_loss.item() - theirs.loss.item()) <= 1e-5
    if "rope_parameters" in changes:  # the scale is not the plain one: the test would see a wrong mscale
        attention = model.model.layers[0].self_attn
        assert attention.scaling != pytest.approx((16 + 8) ** -0.5)


def test_mla_generates_transformers_tokens_through_the_compressed_cache():
    """Greedy decoding with a cache (the compressed latent and the shared RoPE key per layer): the same tokens."""
    family = family_model("deepseek_v3")
    model = ours_from(family)
    prompt = batch()[:, :5]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), family.generate(prompt, **kwargs))


@pytest.mark.parametrize("changes, words", [
    ({"num_key_value_heads": 2}, "num_key_value_heads must equal num_attention_heads"),
    ({"qk_norm": "head"}, "qk_norm, clip_qkv and attention_out_bias must be off"),
    ({"v_head_dim": None}, "needs v_head_dim a positive integer"),
    ({"kv_lora_rank": None}, "q_lora_rank is MLA's: set kv_lora_rank too"),
])
def test_a_config_mla_cannot_run_is_one_line(changes, words):
    mla = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_local_experts=4, q_lora_rank=24,
               kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
    with pytest.raises(ValueError, match=words):
        MoEConfig(**{**mla, **changes})


def test_mla_with_an_o_proj_bias_and_tensor_parallelism_is_refused_in_one_line():
    """MLA's attention_bias puts a bias on o_proj, which every tp rank would add to its partial sum."""
    recipe = load_recipe(ROOT / "recipes/tiny_deepseek_v3.yaml", ["model.attention_bias=true"])
    with pytest.raises(RecipeError, match="model.attention_bias .with MLA, on o_proj too. would be added on each"):
        recipe.check_strategy(recipe.strategy(4)[0].replace(tp=2, pp=1, ep=2, dp=2, moe_backend="auto"))


def test_the_estimate_prices_mla(capsys):
    """MLA's parameters (`shapes.mla_params`; the counts at real size are transformers' numel), its activations
    (benchmarks/memory_accuracy.py's MLA cases, to the byte) and its FLOPs (tests/test_perf.py, torch's count) are
    priced: the estimate names nothing as unpriced."""
    from moe_model.cli import main as moe

    assert moe(["estimate", str(ROOT / "recipes/tiny_deepseek_v3.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unpriced_block_settings"] == []


def test_sdpa_with_values_padded_to_the_query_width_equals_eager():
    """The fused kernels take one width for q, k and v: `MoEMLAttention` zero-pads v (12 wide here, q 24) and slices
    the output; the logits equal eager attention's, which runs the widths as they are."""
    family = family_model("deepseek_v3")
    eager = ours_from(family)
    sdpa = ours_from(family)
    sdpa.config._attn_implementation = "sdpa"
    ids = batch()
    with torch.no_grad():
        assert (eager(input_ids=ids).logits - sdpa(input_ids=ids).logits).abs().max() <= 1e-5
