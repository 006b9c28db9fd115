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

Two kernels, one rule (`grouped_backend`) choosing between them:
- "loop": one `torch.mm` per expert into slices of the shared buffers. The slice bounds are host integers, so the
  caller reads the counts back once per forward (`counts` is a list); the backward reuses them.
- "grouped_mm": `torch._grouped_mm` (the kernel transformers' Mixtral experts and DeepSpeed's AutoEP call), with
  `offs = cumsum(counts)` in int32 computed on the device: `counts` is a tensor and nothing in the forward or the
  backward reads a value back to the host. Forward `x @ W_e^T` and the input gradients are its 2d x 3d form, the
  weight gradients its 2d x 2d form (`grad^T` [N, R] by `x` [R, D], groups along R), which writes an empty
  expert's gradient as zeros (aten's CPU loop: `mm` over an empty slice; the CUDA kernel accepts empty groups only
  in this column-major x row-major layout).

Rows after `sum(counts[:E])` (only with counts of length E + 1: the routes a capacity dropped, sorted last) are
run by neither kernel: their output and input gradient are zeros.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

BACKENDS = ("loop", "grouped_mm")
_forced_backend: str | None = None

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


def grouped_mm_refusal(device_type: str, capability: tuple[int, int] | None, dtypes: tuple[torch.dtype, ...],
                       widths: tuple[int, ...], num_experts: int, stacked: bool, aligned: bool) -> str | None:
    """Why `torch._grouped_mm` cannot serve this call without a host sync, or None where it can.

    Facts from torch's source (aten/src/ATen/native/cuda/GroupedBlas.cpp `_grouped_mm_cuda`, GroupedMMUtils.h,
    cuda/GroupMM.cu; torch 2.13's `_meta_registrations.py` states the same dtype and stride checks): the CUTLASS
    kernel runs only for bf16 inputs and output on compute capability 9.x or 10.x; every other case goes to aten's
    `_grouped_mm_fallback`, which copies `offs` to the host (a sync) and loops over `mm`, as our loop does but
    without its buffers. The kernel needs 16-byte aligned base addresses and row strides (bf16: widths multiple of
    8) and fewer than 1024 groups. On CPU `torch._grouped_mm` is that same fallback loop: nothing to gain.
    """
    if not stacked:
        return "per-expert weight tensors (DeepSpeed's expert modules): the kernel takes one stacked [E, ., .] tensor"
    if device_type != "cuda":
        return f"{device_type}: torch._grouped_mm is aten's per-expert mm loop there, as ours (no fused kernel)"
    if any(d != torch.bfloat16 for d in dtypes):
        return "not bf16: CUDA's grouped kernel is bf16 only; aten's fallback for other dtypes reads offs on the host"
    if capability is None or capability[0] not in (9, 10):
        return f"compute capability {capability}: the grouped kernel is built for sm90 and sm100 only"
    if num_experts >= 1024:
        return f"{num_experts} experts: the grouped kernel takes fewer than 1024 groups"
    if any(w % 8 for w in widths):
        return f"widths {widths}: bf16 rows must be multiples of 8 elements (16-byte strides)"
    if not aligned:
        return "a base address not 16-byte aligned (a view into a flat buffer): the kernel's TMA loads refuse it"
    return None


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def grouped_backend(x: torch.Tensor, w_in, w_down) -> str:
    """"grouped_mm" where `torch._grouped_mm` runs its fused kernel on these operands (`grouped_mm_refusal`), else
    "loop". `x`: the rows or the tokens they are gathered from (its dtype and device); the rows themselves are a
    fresh gather, which the caching allocator aligns, so only the weights' addresses are checked. `force_backend`
    overrides the rule (tests: the CPU stands in for the accelerator, where aten's `_grouped_mm` computes the same
    products)."""
    if _forced_backend is not None:
        return _forced_backend
    stacked = isinstance(w_in, torch.Tensor)
    on_cuda = x.device.type == "cuda"
    # under torch.compile the operands are fake tensors without addresses; its allocations are 16-byte aligned
    aligned = (not on_cuda or not stacked or torch.compiler.is_compiling()
               or (w_in.data_ptr() % 16 == 0 and w_down.data_ptr() % 16 == 0))
    refusal = grouped_mm_refusal(
        x.device.type, _capability(x.device) if on_cuda else None,
        (x.dtype, *((w_in.dtype, w_down.dtype) if stacked else ())),
        tuple(w_in.shape[1:]) + tuple(w_down.shape[1:]) if stacked else (), len(w_in), stacked, aligned)
    return "loop" if refusal else "grouped_mm"


@contextlib.contextmanager
def force_backend(name: str):
    """Every `grouped_backend` call inside returns `name` (tests, and FLOP counting: torch's FlopCounterMode has no
    formula for `_grouped_mm`)."""
    global _forced_backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    previous, _forced_backend = _forced_backend, name
    try:
        yield
    finally:
        _forced_backend = previous


def _spans(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


def _zero_tail(t_RX: torch.Tensor, routed: int) -> torch.Tensor:
    t_RX[routed:].zero_()
    return t_RX


def _mask_tail(t_RX: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows from offs[-1] on (dropped routes) set to zero on the device; `_grouped_mm` leaves them unwritten."""
    routed_R1 = torch.arange(t_RX.shape[0], device=t_RX.device)[:, None] < offs_E[-1]
    return torch.where(routed_R1, t_RX, t_RX.new_zeros(()))


class GroupedExpertFFN(torch.autograd.Function):
    """Weights either stacked (`w_in` [E, N, D], `w_down` [E, D, I]) or one tensor per expert (DeepSpeed's layout).

    `counts`: a list of host integers (the loop) or an integer tensor on the rows' device (`torch._grouped_mm`),
    of length E, or E + 1 where the last entry counts dropped rows at the end."""

    @staticmethod
    def forward(ctx, x_RD, counts, activation: str, gated: bool, stacked: bool, *weights):
        E = len(weights) // 2 if not stacked else weights[0].shape[0]
        w_in, w_down = (weights[0], weights[1]) if stacked else (weights[:E], weights[E:])
        ctx.activation, ctx.gated, ctx.stacked, ctx.E = activation, gated, stacked, E
        ctx.tail, ctx.grouped = len(counts) == E + 1, isinstance(counts, torch.Tensor)
        if ctx.grouped:
            offs_E = torch.cumsum(counts[:E], dim=0, dtype=torch.int32)
            h_RN = torch._grouped_mm(x_RD, w_in.transpose(-2, -1), offs=offs_E)
            a_RI, _ = ffn_activation(h_RN, activation, gated)
            y_RD = torch._grouped_mm(a_RI, w_down.transpose(-2, -1), offs=offs_E)
            if ctx.tail:
                y_RD = _mask_tail(y_RD, offs_E)
            ctx.save_for_backward(x_RD, h_RN, offs_E, *weights)
            return y_RD
        counts = list(counts[:E])
        R, routed = x_RD.shape[0], sum(counts)
        h_RN = x_RD.new_empty(routed, w_in[0].shape[0])
        for e, a, b in _spans(counts):
            torch.mm(x_RD[a:b], w_in[e].t(), out=h_RN[a:b])
        a_RI, _ = ffn_activation(h_RN, activation, gated)
        y_RD = _zero_tail(x_RD.new_empty(R, w_down[0].shape[0]), routed)
        for e, a, b in _spans(counts):
            torch.mm(a_RI[a:b], w_down[e].t(), out=y_RD[a:b])
        ctx.save_for_backward(x_RD, h_RN, *weights)
        ctx.counts = counts
        return y_RD

    @staticmethod
    def backward(ctx, grad_y_RD):
        grad_y_RD = grad_y_RD.contiguous()
        backward = _grouped_mm_backward if ctx.grouped else _loop_backward
        grad_x_RD, weight_grads = backward(ctx, grad_y_RD)
        return grad_x_RD, None, None, None, None, *weight_grads


def _grouped_mm_backward(ctx, grad_y_RD):
    x_RD, h_RN, offs_E, w_in, w_down = ctx.saved_tensors
    a_RI, act_gate_RI = ffn_activation(h_RN, ctx.activation, ctx.gated)  # recomputed rather than saved
    grad_a_RI = torch._grouped_mm(grad_y_RD, w_down, offs=offs_E)
    grad_w_down = torch._grouped_mm(grad_y_RD.t(), a_RI, offs=offs_E)
    del a_RI
    grad_h_RN = ffn_activation_backward(grad_a_RI, h_RN, act_gate_RI, ctx.activation, ctx.gated)
    del grad_a_RI, act_gate_RI
    grad_w_in = torch._grouped_mm(grad_h_RN.t(), x_RD, offs=offs_E)
    grad_x_RD = None
    if ctx.needs_input_grad[0]:
        grad_x_RD = torch._grouped_mm(grad_h_RN, w_in, offs=offs_E)
        if ctx.tail:
            grad_x_RD = _mask_tail(grad_x_RD, offs_E)
    return grad_x_RD, (grad_w_in, grad_w_down)


def _loop_backward(ctx, grad_y_RD):
    x_RD, h_RN, *weights = ctx.saved_tensors
    E, stacked, counts = ctx.E, ctx.stacked, ctx.counts
    w_in, w_down = (weights[0], weights[1]) if stacked else (weights[:E], weights[E:])
    spans = list(_spans(counts))
    a_RI, act_gate_RI = ffn_activation(h_RN, ctx.activation, ctx.gated)  # recomputed rather than saved
    grad_a_RI = torch.empty_like(a_RI)
    grad_w_down = _weight_grads(w_down, stacked, counts)
    for e, a, b in spans:
        torch.mm(grad_y_RD[a:b], w_down[e], out=grad_a_RI[a:b])
        torch.mm(grad_y_RD[a:b].t(), a_RI[a:b], out=grad_w_down[e])
    del a_RI
    grad_h_RN = ffn_activation_backward(grad_a_RI, h_RN, act_gate_RI, ctx.activation, ctx.gated)
    del grad_a_RI, act_gate_RI
    grad_w_in = _weight_grads(w_in, stacked, counts)
    grad_x_RD = _zero_tail(torch.empty_like(x_RD), h_RN.shape[0]) if ctx.needs_input_grad[0] else None
    for e, a, b in spans:
        torch.mm(grad_h_RN[a:b].t(), x_RD[a:b], out=grad_w_in[e])
        if grad_x_RD is not None:
            torch.mm(grad_h_RN[a:b], w_in[e], out=grad_x_RD[a:b])
    return grad_x_RD, ((grad_w_in, grad_w_down) if stacked else (*grad_w_in, *grad_w_down))


def _weight_grads(w, stacked: bool, counts: list[int]):
    """Gradient buffers to write into; experts without rows get zeros (written by no product)."""
    if stacked:
        return torch.zeros_like(w) if 0 in counts else torch.empty_like(w)
    return [torch.zeros_like(w_e) if n == 0 else torch.empty_like(w_e) for w_e, n in zip(w, counts)]


def grouped_expert_ffn(x_RD: torch.Tensor, w_in, w_down, counts, activation: str, gated: bool) -> torch.Tensor:
    """y_RD: row r goes through the FFN of the expert that owns it (see module docstring for the layout).

    `w_in` / `w_down`: stacked tensors [E, N, D] / [E, D, I], or sequences of E tensors [N, D] / [D, I];
    `counts`: rows per expert, E of them, or E + 1 with the dropped rows (output zero) last; a list runs the
    loop, an integer tensor on the rows' device `torch._grouped_mm` (choose with `grouped_backend`; its sum is
    not checked against the rows, which would read it back to the host); `activation`: "silu" or "gelu" (exact,
    as `F.gelu`)."""
    stacked = isinstance(w_in, torch.Tensor)
    E = len(w_in)
    if len(counts) not in (E, E + 1) or len(w_down) != E:
        raise ValueError(f"counts ({len(counts)} entries) do not match experts {E} / {len(w_down)}")
    if not isinstance(counts, torch.Tensor) and sum(counts) != x_RD.shape[0]:
        raise ValueError(f"counts (sum {sum(counts)}, {len(counts)} entries) do not match rows {x_RD.shape[0]}")
    if isinstance(counts, torch.Tensor) and not stacked:
        raise ValueError("torch._grouped_mm needs stacked weights: pass counts as a list for per-expert tensors")
    weights = (w_in, w_down) if stacked else (*w_in, *w_down)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    return GroupedExpertFFN.apply(x_RD, counts, activation, gated, stacked, *weights)
