"""Parameter counts by formula against the numel of the real model (meta device: no memory)."""

import pytest
import torch

from moe_model import MoEConfig, MoEForCausalLM
from moe_model.estimate import count_params
from moe_model.recipe import load_recipe
from tests.conftest import ROOT

SHAPES = [
    dict(hidden_act="gelu"),
    dict(hidden_act="silu", num_key_value_heads=4, tie_word_embeddings=True),
    dict(hidden_act="silu", num_local_experts=7, num_experts_per_tok=3, head_dim=24, num_attention_heads=6,
         num_key_value_heads=2),
    dict(hidden_act="gelu", vocab_size=50257, hidden_size=96, intermediate_size=80, num_hidden_layers=5),
]


def meta_numel(config: MoEConfig, predicate=lambda name: True) -> int:
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    return sum(p.numel() for name, p in model.named_parameters() if predicate(name))


@pytest.mark.parametrize("shape", SHAPES)
def test_counts_equal_numel(shape):
    base = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                num_local_experts=6, num_experts_per_tok=2)
    config = MoEConfig(**{**base, **shape})
    counts = count_params(config)
    assert counts.total == meta_numel(config)
    assert counts.expert == meta_numel(config, lambda n: ".experts." in n)
    assert counts.embedding == meta_numel(config, lambda n: "embed_tokens" in n or "lm_head" in n)
    assert counts.non_expert + counts.expert == counts.total


def test_active_params_equal_a_dense_model_with_k_experts():
    """A token's active parameters are those of the same model holding only its k experts."""
    config = MoEConfig(vocab_size=500, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_local_experts=8, num_experts_per_tok=2, hidden_act="silu")
    only_k = MoEConfig(**{**config.to_dict(), "num_local_experts": 2})
    router_difference = 2 * 48 * (8 - 2)  # the router still scores all E experts
    assert count_params(config).active_per_token == meta_numel(only_k) + router_difference


def test_seed_model_count_from_its_recipe():
    config = load_recipe(ROOT / "recipes/seed_4b.yaml").moe_config()
    assert count_params(config).total == meta_numel(config)
    assert 4.3e9 < count_params(config).total < 4.5e9  # DESIGN.md: "the stated shape has about 4.4B"
