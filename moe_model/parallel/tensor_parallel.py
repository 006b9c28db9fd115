"""Megatron-style tensor parallelism for attention: heads split over the tp group.

q, k and v are column-parallel (each rank holds H/tp query heads and Hkv/tp key/value heads); o is row-parallel and
its partial outputs are summed over the group. Two autograd functions place the communication (Megatron's f and g):
`copy_to_tp` is the identity forward and an all-reduce of the input gradient backward; `reduce_from_tp` all-reduces
forward and is the identity backward. Parameters outside attention are replicated over tp; their gradients are equal
on every tp rank because the all-reduces above make every rank's upstream gradient the full one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..modeling import MoEAttention, apply_rope


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


class TensorParallelAttention(nn.Module):
    """`MoEAttention` with this rank's heads; the same forward signature (no KV cache: training only)."""

    def __init__(self, dense: MoEAttention, tp_rank: int, tp: int, group):
        super().__init__()
        self.group = group
        self.head_dim = dense.head_dim
        self.num_heads, self.num_kv_heads = dense.num_heads // tp, dense.num_kv_heads // tp
        q_rows, kv_rows = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # the same module names as MoEAttention, holding this rank's slice: q/k/v by output rows, o by input columns
        self.q_proj = self._linear(dense.q_proj.weight[tp_rank * q_rows:(tp_rank + 1) * q_rows])
        self.k_proj = self._linear(dense.k_proj.weight[tp_rank * kv_rows:(tp_rank + 1) * kv_rows])
        self.v_proj = self._linear(dense.v_proj.weight[tp_rank * kv_rows:(tp_rank + 1) * kv_rows])
        self.o_proj = self._linear(dense.o_proj.weight[:, tp_rank * q_rows:(tp_rank + 1) * q_rows])
        for param in self.parameters():
            mark_tensor_parallel(param)

    @staticmethod
    def _linear(weight_slice: torch.Tensor) -> nn.Linear:
        linear = nn.Linear(weight_slice.shape[1], weight_slice.shape[0], bias=False)
        linear.weight = nn.Parameter(weight_slice.detach().clone())
        return linear

    def forward(self, x_BSD, cos_sin, mask=None, cache=None):
        if cache is not None:
            raise ValueError("tensor-parallel attention is for training: no KV cache")
        B, S, _ = x_BSD.shape
        x_BSD = copy_to_tp(x_BSD, self.group)
        q_BHSd = self.q_proj(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        k_BHSd = self.k_proj(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        v_BHSd = self.v_proj(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        q_BHSd, k_BHSd = apply_rope(q_BHSd, *cos_sin), apply_rope(k_BHSd, *cos_sin)
        out_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BHSd, v_BHSd, attn_mask=mask,
                                                  is_causal=mask is None and S > 1,
                                                  enable_gqa=self.num_kv_heads != self.num_heads)
        partial_BSD = self.o_proj(out_BHSd.transpose(1, 2).reshape(B, S, -1))
        return reduce_from_tp(partial_BSD, self.group)
