"""All experts' FFNs over token rows grouped by expert, as one autograd op.

The rows of `x_RD` are sorted by expert (expert e owns the `counts[e]` rows after those of experts < e); the weights
are the stacked parameters `w_in` [E, N, D] (N = 2I gated: gate rows then up rows; N = I otherwise) and `w_down`
[E, D, I], or the same as one tensor per expert (DeepSpeed's expert modules).

Why a hand-written backward: through plain autograd every per-expert product allocates its own output and its own
weight gradient, and indexing or unbinding the stacked parameter costs a full-size gradient per expert or a stack of
all of them. On CPU each fresh allocation of that size is page faults; at the seed's layer shape they cost more
than the products. Here every product writes into a slice of one buffer per tensor (activations [R, .], weight
gradients [E, ., .]), the weight gradients come out already stacked, and only the FFN's pre-activation `h_RN` and
its input are saved: the activation is recomputed in backward (elementwise, cheap) instead of kept. Its derivative
is aten's own (`silu_backward`, `gelu_backward`: what autograd runs for `F.silu` / `F.gelu`), not a nested
`autograd.grad`, which hooks over several tensors (torch's FlopCounterMode among them) refuse inside a backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# name -> (activation, its derivative as aten computes it: d(act)(x) * grad)
ACTIVATIONS = {
    "silu": (F.silu, lambda grad, x: torch.ops.aten.silu_backward(grad, x)),
    "gelu": (F.gelu, lambda grad, x: torch.ops.aten.gelu_backward(grad, x)),
}


def ffn_activation(h_RN: torch.Tensor, activation: str, gated: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a, act(gate)): gated, a = act(gate) * up with h = [gate | up]; otherwise a = act(h) and no act(gate)."""
    act = ACTIVATIONS[activation][0]
    if gated:
        gate_RI, up_RI = h_RN.chunk(2, dim=-1)
        act_gate_RI = act(gate_RI)
        return act_gate_RI * up_RI, act_gate_RI
    return act(h_RN), None


def ffn_activation_backward(grad_a_RI: torch.Tensor, h_RN: torch.Tensor, act_gate_RI: torch.Tensor | None,
                            activation: str, gated: bool) -> torch.Tensor:
    """d(loss)/d(h) from d(loss)/d(a), a = ffn_activation(h); `act_gate_RI` is its act(gate) (gated only)."""
    act_backward = ACTIVATIONS[activation][1]
    if not gated:
        return act_backward(grad_a_RI, h_RN)
    gate_RI, up_RI = h_RN.chunk(2, dim=-1)
    grad_h_RN = torch.empty_like(h_RN)
    grad_gate_RI, grad_up_RI = grad_h_RN.chunk(2, dim=-1)
    torch.mul(grad_a_RI, act_gate_RI, out=grad_up_RI)
    grad_gate_RI.copy_(act_backward(grad_a_RI * up_RI, gate_RI))
    return grad_h_RN


def _spans(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


class GroupedExpertFFN(torch.autograd.Function):
    """Weights either stacked (`w_in` [E, N, D], `w_down` [E, D, I]) or one tensor per expert (DeepSpeed's layout)."""

    @staticmethod
    def forward(ctx, x_RD, counts: list[int], activation: str, gated: bool, stacked: bool, *weights):
        E = len(counts)
        w_in, w_down = (weights[0], weights[1]) if stacked else (weights[:E], weights[E:])
        R = x_RD.shape[0]
        h_RN = x_RD.new_empty(R, w_in[0].shape[0])
        for e, a, b in _spans(counts):
            torch.mm(x_RD[a:b], w_in[e].t(), out=h_RN[a:b])
        a_RI, _ = ffn_activation(h_RN, activation, gated)
        y_RD = x_RD.new_empty(R, w_down[0].shape[0])
        for e, a, b in _spans(counts):
            torch.mm(a_RI[a:b], w_down[e].t(), out=y_RD[a:b])
        ctx.save_for_backward(x_RD, h_RN, *weights)
        ctx.counts, ctx.activation, ctx.gated, ctx.stacked = counts, activation, gated, stacked
        return y_RD

    @staticmethod
    def backward(ctx, grad_y_RD):
        x_RD, h_RN, *weights = ctx.saved_tensors
        E, stacked = len(ctx.counts), ctx.stacked
        w_in, w_down = (weights[0], weights[1]) if stacked else (weights[:E], weights[E:])
        spans = list(_spans(ctx.counts))
        grad_y_RD = grad_y_RD.contiguous()
        a_RI, act_gate_RI = ffn_activation(h_RN, ctx.activation, ctx.gated)  # recomputed rather than saved
        grad_a_RI = torch.empty_like(a_RI)
        grad_w_down = _weight_grads(w_down, stacked, ctx.counts)
        for e, a, b in spans:
            torch.mm(grad_y_RD[a:b], w_down[e], out=grad_a_RI[a:b])
            torch.mm(grad_y_RD[a:b].t(), a_RI[a:b], out=grad_w_down[e])
        del a_RI
        grad_h_RN = ffn_activation_backward(grad_a_RI, h_RN, act_gate_RI, ctx.activation, ctx.gated)
        del grad_a_RI, act_gate_RI
        grad_w_in = _weight_grads(w_in, stacked, ctx.counts)
        grad_x_RD = torch.empty_like(x_RD) if ctx.needs_input_grad[0] else None
        for e, a, b in spans:
            torch.mm(grad_h_RN[a:b].t(), x_RD[a:b], out=grad_w_in[e])
            if grad_x_RD is not None:
                torch.mm(grad_h_RN[a:b], w_in[e], out=grad_x_RD[a:b])
        weight_grads = (grad_w_in, grad_w_down) if stacked else (*grad_w_in, *grad_w_down)
        return grad_x_RD, None, None, None, None, *weight_grads


def _weight_grads(w, stacked: bool, counts: list[int]):
    """Gradient buffers to write into; experts without rows get zeros (written by no product)."""
    if stacked:
        return torch.zeros_like(w) if 0 in counts else torch.empty_like(w)
    return [torch.zeros_like(w_e) if n == 0 else torch.empty_like(w_e) for w_e, n in zip(w, counts)]


def grouped_expert_ffn(x_RD: torch.Tensor, w_in, w_down, counts: list[int], activation: str,
                       gated: bool) -> torch.Tensor:
    """y_RD: row r goes through the FFN of the expert that owns it (see module docstring for the layout).

    `w_in` / `w_down`: stacked tensors [E, N, D] / [E, D, I], or sequences of E tensors [N, D] / [D, I];
    `activation`: "silu" or "gelu" (exact, as `F.gelu`)."""
    stacked = isinstance(w_in, torch.Tensor)
    if sum(counts) != x_RD.shape[0] or len(counts) != len(w_in) or len(w_in) != len(w_down):
        raise ValueError(f"counts (sum {sum(counts)}, {len(counts)} experts) do not match rows {x_RD.shape[0]} "
                         f"and experts {len(w_in)} / {len(w_down)}")
    weights = (w_in, w_down) if stacked else (*w_in, *w_down)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return GroupedExpertFFN.apply(x_RD, counts, activation, gated, stacked, *weights)
