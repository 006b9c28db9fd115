"""The grouped expert op against plain autograd over per-expert `F.linear` calls (the reference it replaces)."""

import pytest
import torch
import torch.nn.functional as F

from moe_model.grouped_ffn import grouped_expert_ffn


def reference(x_RD, w_in, w_down, counts, act_fn, gated):
    out = []
    for e, x_ND in enumerate(x_RD.split(counts)):
        h = F.linear(x_ND, w_in[e])
        if gated:
            gate, up = h.chunk(2, dim=-1)
            a = act_fn(gate) * up
        else:
            a = act_fn(h)
        out.append(F.linear(a, w_down[e]))
    return torch.cat(out)


@pytest.mark.parametrize("gated", [True, False])
def test_forward_and_every_gradient_equal_per_expert_autograd(gated):
    torch.manual_seed(0)
    E, D, I = 5, 6, 4
    counts = [3, 0, 7, 1, 0]  # experts without rows must get zero weight gradients
    activation, act_fn = ("silu", F.silu) if gated else ("gelu", F.gelu)
    x = torch.randn(sum(counts), D, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(E, 2 * I if gated else I, D, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(E, D, I, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(sum(counts), D, dtype=torch.float64)

    ours = grouped_expert_ffn(x, w_in, w_down, counts, activation, gated)
    ours_grads = torch.autograd.grad(ours, (x, w_in, w_down), grad_y)
    ref = reference(x, w_in, w_down, counts, act_fn, gated)
    ref_grads = torch.autograd.grad(ref, (x, w_in, w_down), grad_y)

    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("x", "w_in", "w_down"), ours_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"gradient of {name}")
    assert ours_grads[1][1].abs().sum() == 0 and ours_grads[2][4].abs().sum() == 0


def test_gradcheck_gated():
    torch.manual_seed(1)
    counts = [2, 1, 0, 3]
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(4, 4, 3, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: grouped_expert_ffn(a, b, c, counts, "silu", True), (x, w_in, w_down))


def test_counts_that_do_not_match_the_rows_are_refused():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="counts"):
        grouped_expert_ffn(x, torch.randn(2, 4, 3), torch.randn(2, 3, 2), [1, 2], "silu", True)


def test_per_expert_weight_tensors_give_the_stacked_result_and_gradients():
    """DeepSpeed keeps one module per expert: the op takes their weights as lists, with per-expert gradients."""
    torch.manual_seed(2)
    counts = [4, 0, 3]
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(3, 8, 5, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    in_list = [w.detach().clone().requires_grad_() for w in w_in]
    down_list = [w.detach().clone().requires_grad_() for w in w_down]
    grad_y = torch.randn(7, 5, dtype=torch.float64)

    stacked = grouped_expert_ffn(x, w_in, w_down, counts, "silu", True)
    stacked_grads = torch.autograd.grad(stacked, (w_in, w_down), grad_y)
    listed = grouped_expert_ffn(x, in_list, down_list, counts, "silu", True)
    listed_grads = torch.autograd.grad(listed, (*in_list, *down_list), grad_y)

    torch.testing.assert_close(listed, stacked, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(listed_grads[:3]), stacked_grads[0], rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(listed_grads[3:]), stacked_grads[1], rtol=0, atol=0)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="activation"):
        grouped_expert_ffn(torch.randn(3, 3), torch.randn(1, 4, 3), torch.randn(1, 3, 2), [3], "relu", True)
