"""All experts' FFNs over token rows grouped by expert, as one autograd op.

The rows of `x_RD` are sorted by expert (expert e owns rows `[offsets[e], offsets[e+1])`); the weights are the stacked
parameters `w_in` [E, N, D] (N = 2I gated: gate rows then up rows; N = I otherwise) and `w_down` [E, D, I].

Why a hand-written backward: through plain autograd every per-expert product allocates its own output and its own
weight gradient, and indexing or unbinding the stacked parameter costs a full-size gradient per expert or a stack of
all of them. On CPU each fresh allocation of that size is page faults; at the seed's layer shape they cost more
than the products. Here every product writes into a slice of one buffer per tensor (activations [R, .], weight
gradients [E, ., .]), the weight gradients come out already stacked, and only the FFN's pre-activation `h_RN` and
its input are saved: the activation is recomputed in backward (elementwise, cheap) instead of kept.
"""

from __future__ import annotations

from typing import Callable

import torch

Activation = Callable[[torch.Tensor], torch.Tensor]


def ffn_activation(h_RN: torch.Tensor, act_fn: Activation, gated: bool) -> torch.Tensor:
    """gated: act(gate) * up with h = [gate | up]; otherwise act(h)."""
    if gated:
        gate_RI, up_RI = h_RN.chunk(2, dim=-1)
        return act_fn(gate_RI) * up_RI
    return act_fn(h_RN)


def _spans(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


class GroupedExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, w_in_END, w_down_EDI, counts: list[int], act_fn: Activation, gated: bool):
        R = x_RD.shape[0]
        h_RN = x_RD.new_empty(R, w_in_END.shape[1])
        for e, a, b in _spans(counts):
            torch.mm(x_RD[a:b], w_in_END[e].t(), out=h_RN[a:b])
        a_RI = ffn_activation(h_RN, act_fn, gated)
        y_RD = x_RD.new_empty(R, w_down_EDI.shape[1])
        for e, a, b in _spans(counts):
            torch.mm(a_RI[a:b], w_down_EDI[e].t(), out=y_RD[a:b])
        ctx.save_for_backward(x_RD, h_RN, w_in_END, w_down_EDI)
        ctx.counts, ctx.act_fn, ctx.gated = counts, act_fn, gated
        return y_RD

    @staticmethod
    def backward(ctx, grad_y_RD):
        x_RD, h_RN, w_in_END, w_down_EDI = ctx.saved_tensors
        spans = list(_spans(ctx.counts))
        grad_y_RD = grad_y_RD.contiguous()
        with torch.enable_grad():  # recompute the activation and let autograd differentiate it (any act_fn)
            h_leaf_RN = h_RN.detach().requires_grad_()
            a_RI = ffn_activation(h_leaf_RN, ctx.act_fn, ctx.gated)
        grad_a_RI = torch.empty_like(a_RI)
        grad_w_down = torch.zeros_like(w_down_EDI) if len(spans) < len(ctx.counts) else torch.empty_like(w_down_EDI)
        for e, a, b in spans:
            torch.mm(grad_y_RD[a:b], w_down_EDI[e], out=grad_a_RI[a:b])
            torch.mm(grad_y_RD[a:b].t(), a_RI[a:b].detach(), out=grad_w_down[e])
        (grad_h_RN,) = torch.autograd.grad(a_RI, h_leaf_RN, grad_a_RI)
        del a_RI, grad_a_RI
        grad_w_in = torch.zeros_like(w_in_END) if len(spans) < len(ctx.counts) else torch.empty_like(w_in_END)
        grad_x_RD = torch.empty_like(x_RD) if ctx.needs_input_grad[0] else None
        for e, a, b in spans:
            torch.mm(grad_h_RN[a:b].t(), x_RD[a:b], out=grad_w_in[e])
            if grad_x_RD is not None:
                torch.mm(grad_h_RN[a:b], w_in_END[e], out=grad_x_RD[a:b])
        return grad_x_RD, grad_w_in, grad_w_down, None, None, None


def grouped_expert_ffn(x_RD: torch.Tensor, w_in_END: torch.Tensor, w_down_EDI: torch.Tensor, counts: list[int],
                       act_fn: Activation, gated: bool) -> torch.Tensor:
    """y_RD: row r goes through the FFN of the expert that owns it (see module docstring for the layout)."""
    if sum(counts) != x_RD.shape[0] or len(counts) != w_in_END.shape[0]:
        raise ValueError(f"counts (sum {sum(counts)}, {len(counts)} experts) do not match rows {x_RD.shape[0]} "
                         f"and experts {w_in_END.shape[0]}")
    return GroupedExpertFFN.apply(x_RD, w_in_END, w_down_EDI, counts, act_fn, gated)
