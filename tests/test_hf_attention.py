"""The attention implementations transformers offers give the same logits on a padded batch (CPU: eager, SDPA,
flex; flash needs a GPU and its package)."""

import pytest
import torch

from moe_model import MoEConfig, MoEForCausalLM

SHAPE = dict(vocab_size=97, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
             pad_token_id=0)


@pytest.mark.parametrize("implementation", ["sdpa", "flex_attention"])
def test_attention_implementation_equals_eager_on_real_tokens(implementation):
    torch.manual_seed(0)
    model = MoEForCausalLM(MoEConfig(**SHAPE, hidden_act="silu")).eval()
    ids = torch.randint(1, SHAPE["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        model.set_attn_implementation(implementation)
        other = model(input_ids=ids, attention_mask=mask)
    assert model.config._attn_implementation == implementation
    real = mask.bool()
    torch.testing.assert_close(other.logits[real], eager.logits[real], rtol=1e-5, atol=1e-5)
    weights = eager.attentions[0]  # [B, H, S, K]: padded keys get no weight, every row sums to 1
    assert weights.shape == (2, SHAPE["num_attention_heads"], 9, 9)
    assert weights[1, :, 3:, :3].abs().max() == 0
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, SHAPE["num_attention_heads"], 9))
