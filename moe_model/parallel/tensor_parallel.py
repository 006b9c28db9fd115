"""Megatron-style tensor parallelism for attention: heads split over the tp group.

q, k and v are column-parallel (each rank holds H/tp query heads and Hkv/tp key/value heads); o is row-parallel and
its partial outputs are summed over the group. Two autograd functions place the communication (Megatron's f and g):
`copy_to_tp` is the identity forward and an all-reduce of the input gradient backward; `reduce_from_tp` all-reduces
forward and is the identity backward. Parameters outside attention are replicated over tp; their gradients are equal
on every tp rank because the all-reduces above make every rank's upstream gradient the full one.

The attention itself is the model's `MoEAttention` (or `MoEMLAttention`) built with this rank's heads: one forward
of each attention in the codebase. Multi-head latent attention splits its heads the same way (q or q_b, kv_b by
rows, o by columns); its low-rank down-projections (q_a, kv_a) and their norms stay whole on every rank, and `f`
sits after them, on each latent (and the shared RoPE key) where it enters the heads, so that their gradients are
summed over the ranks' heads and the replicated weights stay equal.

f and g are hand-written because torch's `ColwiseParallel`/`RowwiseParallel` shard DTensors over a DeviceMesh,
while DeepSpeed's pipeline grid hands out plain process groups.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..modeling import MoEAttention, MoEMLAttention, MoERMSNorm


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def mark_tensor_parallel(param: nn.Parameter) -> None:
    """DeepSpeed counts a tp-split parameter on every tp rank in the global grad norm, a replicated one once."""
    param.tensor_model_parallel = True
    param.model_parallel = True


class HeadNorm(MoERMSNorm):
    """A per-head q/k RMSNorm on a tp rank: one weight [Hd] for all heads, each rank normalising its own heads, so
    the weight's gradient here is a sum over this rank's heads only; `copy_to_tp` sums it over the tp group, and the
    replicated weight stays equal on every rank (counted once in the grad norm: not marked tensor-parallel)."""

    def __init__(self, dense: MoERMSNorm, group):
        super().__init__(dense.weight.shape[0], dense.eps)
        self.group = group
        with torch.no_grad():
            self.weight.copy_(dense.weight)

    def scale(self) -> torch.Tensor:
        return copy_to_tp(self.weight, self.group)


class TensorParallelAttention(MoEAttention):
    """`MoEAttention` holding this rank's heads, its forward between Megatron's f and g (no KV cache: training only).

    The same module names as `MoEAttention` (so state dicts map by name), each holding this rank's slice: q/k/v by
    output rows, o by input columns.
    """

    def __init__(self, dense: MoEAttention, tp_rank: int, tp: int, group):
        super().__init__(dense.config, dense.layer_idx, dense.num_heads // tp, dense.num_kv_heads // tp)
        self.group = group
        q_rows, kv_rows = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        with torch.no_grad():
            for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                for part, tensor in getattr(dense, name).named_parameters():  # weight rows, and bias (attention_bias)
                    getattr(getattr(self, name), part).copy_(tensor[tp_rank * rows:(tp_rank + 1) * rows])
            self.o_proj.weight.copy_(dense.o_proj.weight[:, tp_rank * q_rows:(tp_rank + 1) * q_rows])
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            for param in proj.parameters():
                mark_tensor_parallel(param)
        if self.qk_norm is not None:  # "head" (a projection-wide norm with tp is refused: `Strategy.layout_problem`)
            self.q_norm = HeadNorm(dense.q_norm, group)
            self.k_norm = HeadNorm(dense.k_norm, group)

    def forward(self, x_BSD, cos_sin, mask=None, cache=None, **kwargs):
        if cache is not None:
            raise ValueError("tensor-parallel attention is for training: no KV cache")
        partial_BSD, weights = super().forward(copy_to_tp(x_BSD, self.group), cos_sin, mask, **kwargs)
        return reduce_from_tp(partial_BSD, self.group), weights


class TensorParallelMLA(MoEMLAttention):
    """`MoEMLAttention` holding this rank's heads (module docstring), training only: q (or q_b) and kv_b hold their
    heads' output rows, o its columns; q_a, kv_a and their norms whole. The same module names (state dicts map by
    name)."""

    def __init__(self, dense: MoEMLAttention, tp_rank: int, tp: int, group):
        super().__init__(dense.config, dense.layer_idx, dense.num_heads // tp)
        self.group = group
        H, q, kv = self.num_heads, self.qk_dim, self.nope + self.v_dim
        split = {"q_proj": H * q, "q_b_proj": H * q, "kv_b_proj": H * kv}
        with torch.no_grad():
            for name, module in self.named_children():
                source = getattr(dense, name)
                if name in split:
                    rows = split[name]
                    module.weight.copy_(source.weight[tp_rank * rows:(tp_rank + 1) * rows])
                elif name == "o_proj":  # (no bias: an o bias with tp is refused, `Strategy.layout_problem`)
                    cols = H * self.v_dim
                    module.weight.copy_(source.weight[:, tp_rank * cols:(tp_rank + 1) * cols])
                else:  # q_a, kv_a and their norms: whole
                    module.load_state_dict(source.state_dict())
        for name in (*split, "o_proj"):
            if hasattr(self, name):
                mark_tensor_parallel(getattr(self, name).weight)

    def to_heads(self, shared: torch.Tensor) -> torch.Tensor:
        return copy_to_tp(shared, self.group)

    def forward(self, x_BSD, cos_sin, mask=None, cache=None, **kwargs):
        if cache is not None:
            raise ValueError("tensor-parallel attention is for training: no KV cache")
        partial_BSD, weights = super().forward(x_BSD, cos_sin, mask, **kwargs)
        return reduce_from_tp(partial_BSD, self.group), weights
