"""Balancing the experts' load: the sequence-level balance loss and the aux-loss-free score-bias update.

The sequence-level loss is held to the batch loss of each sequence alone (the model run on one sequence at a time:
routing never looks across sequences); the bias rule to DeepSeek-V3's statement of it on a hand-made load, and to
its purpose: with the weights frozen and no aux loss, updating the bias alone evens a skewed load out.
"""

from __future__ import annotations

import pytest
import torch

from moe_model import MoEConfig, MoEForCausalLM
from moe_model.routing import bias_update, expert_counts, load_balancing_loss, route


def test_the_sequence_level_loss_is_the_mean_of_each_sequences_own_loss():
    torch.manual_seed(0)
    B, S, E, K = 3, 16, 8, 2
    probs_TE = torch.softmax(torch.randn(B * S, E), dim=-1)
    experts_TK = torch.topk(probs_TE + 0.3 * torch.rand(B * S, E), K, dim=-1).indices
    each = [load_balancing_loss(probs_TE[b * S:(b + 1) * S], experts_TK[b * S:(b + 1) * S]) for b in range(B)]
    assert torch.allclose(load_balancing_loss(probs_TE, experts_TK, sequences=B), torch.stack(each).mean(), atol=1e-6)
    assert not torch.allclose(load_balancing_loss(probs_TE, experts_TK), torch.stack(each).mean(), atol=1e-4)
    # padding: a sequence's loss over its real tokens; a sequence of padding alone counts 0 in the mean
    mask_BS = torch.ones(B, S)
    mask_BS[0, 10:] = 0
    mask_BS[2] = 0
    real = [load_balancing_loss(probs_TE[:10], experts_TK[:10]), each[1], torch.tensor(0.0)]
    assert torch.allclose(load_balancing_loss(probs_TE, experts_TK, mask_BS.reshape(-1), sequences=B),
                          torch.stack(real).mean(), atol=1e-6)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_the_models_sequence_level_aux_loss_is_its_loss_on_each_sequence_alone(scoring):
    extra = {"router_score_bias": True} if scoring == "sigmoid" else {}
    config = MoEConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_local_experts=8, num_experts_per_tok=2, hidden_act="silu",
                       dense_layers=[0], router_scoring=scoring, router_aux_loss_per_sequence=True, **extra)
    torch.manual_seed(1)
    model = MoEForCausalLM(config).eval()
    ids_BS = torch.randint(0, 64, (3, 12))
    with torch.no_grad():
        together = model(ids_BS).aux_loss
        alone = torch.stack([model(ids_BS[b:b + 1]).aux_loss for b in range(3)]).mean()
        config.router_aux_loss_per_sequence = False
        batch = model(ids_BS).aux_loss
    assert torch.allclose(together, alone, atol=1e-6), (together, alone)
    assert not torch.allclose(together, batch, atol=1e-5)


def test_the_bias_moves_each_expert_by_the_rate_towards_the_mean_load():
    counts_LE = torch.tensor([[3, 1, 2, 2], [0, 0, 4, 4]])  # means 2 and 2
    assert torch.equal(bias_update(counts_LE, 0.001), torch.tensor([[-0.001, 0.001, 0.0, 0.0],
                                                                    [0.001, 0.001, -0.001, -0.001]]))


def busiest_over_mean(logits_TE, bias_E, top_k) -> float:
    counts_E = expert_counts(route(logits_TE, top_k, "sigmoid", bias_E=bias_E).experts_TK, logits_TE.shape[1])
    return (counts_E.max() / counts_E.float().mean()).item()


def test_updating_the_bias_alone_evens_out_a_skewed_load():
    """Frozen router logits skewed towards the first experts (their scores higher for most tokens), 100 updates of
    the bias from the load they route: the busiest expert's load over the mean falls to near 1."""
    torch.manual_seed(2)
    T, E, K = 512, 16, 2
    logits_TE = torch.randn(T, E) + torch.linspace(2.0, -2.0, E)
    bias_E = torch.zeros(E)
    before = busiest_over_mean(logits_TE, bias_E, K)
    for _ in range(100):
        counts_E = expert_counts(route(logits_TE, K, "sigmoid", bias_E=bias_E).experts_TK, E)
        bias_E += bias_update(counts_E[None], 0.01)[0]
    after = busiest_over_mean(logits_TE, bias_E, K)
    print(f"busiest expert's load over the mean: {before:.2f} before, {after:.2f} after 100 bias updates (rate 0.01)")
    assert before > 3.0 and after < 1.3, (before, after)
