"""The time of one GEMM by its shape, and how many other kernels a decoder layer launches.

GEMM [M, K] x [K, N] (`gemm_seconds`), in b-byte operands, with the device's figures (`hardware.*`, `devices.py`):

    time = launches * t_kernel + max(2 M N K / (rate * q * K / (K + K_half)), b (M K + K N + M N) / bandwidth)

- rate = peak * mfu, the rate of a large, well-shaped GEMM;
- q, tile and wave quantisation: the output is cut into tiles of tm x tn, one per SM at a time, so a kernel runs
  ceil(tiles / SMs) waves of SMs * tm * tn outputs, of which M N (summed over a grouped kernel's groups) are useful:
  q = useful / (waves * SMs * tm * tn). A grouped GEMM (`torch._grouped_mm`, one kernel for every expert) pools
  its experts' tiles; a loop over experts (DeepSpeed's expert modules) quantises and launches each on its own;
- K / (K + K_half): a tile's main loop pays a fixed prologue and epilogue whatever its depth K, so a shallow GEMM
  (a weight gradient over an expert's few rows) runs below the rate;
- t_kernel, the fixed cost of one kernel (eager dispatch and launch), the floor of any kernel's time.
With `devices.FLAT` figures (no SMs, K_half 0, no kernel cost) this is the roofline `max(FLOPs / rate, bytes /
bandwidth)`. The backward of Y = X W runs two GEMMs: dX = dY W^T (M x K, depth N) and dW = X^T dY (K x N, depth M).
Sources: wave quantisation as NVIDIA's "Matrix Multiplication Background" user guide states it (tiles, waves, SMs);
the roofline as in perf.py.

Other kernels (`counted_kernels`): the aten operations one decoder layer of the model dispatches that are neither a
GEMM nor a view (norms, RoPE, routing's softmax/top-k/sort, the permutation's gathers and scatters, the grouped
GEMM's offsets, residual adds, ...), counted by running the model's own code (`modeling.MoEForCausalLM`, grouped
GEMMs forced as on a Hopper GPU) at a shrunken width under a `TorchDispatchMode`, forward and backward: every one is a
kernel on a GPU, each costing at least t_kernel. perf.py adds their count times t_kernel to the element-wise bytes.
Library gap: neither torch's FlopCounterMode nor DeepSpeed's flops profiler counts launches; a dispatch mode is the
one place every aten op passes.
"""

from __future__ import annotations

import functools
import json
from typing import NamedTuple

import numpy as np

# aten ops that launch no kernel (views, metadata, allocation without a fill) and the GEMMs `gemm_seconds` prices
NO_KERNEL = frozenset({
    "view", "_unsafe_view", "t", "transpose", "expand", "permute", "reshape", "unsqueeze", "squeeze", "slice",
    "select", "split", "split_with_sizes", "as_strided", "alias", "detach", "unbind", "chunk", "lift_fresh", "empty",
    "empty_like", "new_empty", "empty_strided", "_reshape_alias", "new_empty_strided", "sym_size", "is_same_size",
    "_local_scalar_dense"})
GEMMS = frozenset({"mm", "bmm", "addmm", "_grouped_mm", "matmul", "linear", "baddbmm"})


def gemm_seconds(s, M, N, K, groups=1, grouped=True):
    """Seconds of `groups` GEMMs [M, K] x [K, N] (numbers or numpy arrays): one grouped kernel, or with `grouped`
    false one kernel per group. `s`: a `perf.Shape` (its rate, bandwidth, bytes b and the device's shape figures)."""
    M = np.asarray(M, dtype=float)
    flops = 2.0 * M * N * K * groups
    nbytes = s.b * groups * (M * K + K * N + M * N)
    launches = 1 if np.ndim(grouped) == 0 and grouped else np.where(grouped, 1, groups)
    if s.sm_count:
        tm, tn = s.gemm_tile
        per_kernel = groups / launches
        waves = np.ceil(np.ceil(M / tm) * np.ceil(N / tn) * per_kernel / s.sm_count)
        q = np.where(M > 0, M * N * per_kernel / np.maximum(waves * s.sm_count * tm * tn, 1.0), 1.0)
    else:
        q = 1.0
    depth = K / (K + s.gemm_k_half) if np.ndim(K) or K else 1.0
    compute = flops / (s.compute_flops * q * np.maximum(depth, 1e-12))
    return launches * s.launch_s + np.maximum(compute, nbytes / s.hbm_bytes_s)


def gemm_backward_seconds(s, M, N, K, groups=1, grouped=True):
    """The two GEMMs of Y = X W's backward: dX = dY W^T and dW = X^T dY (`gemm_seconds` each)."""
    return gemm_seconds(s, M, K, N, groups, grouped) + gemm_seconds(s, K, N, M, groups, grouped)


class KernelCounts(NamedTuple):
    """Kernels other than GEMMs one rank launches per micro-batch: an MoE layer's, a dense FFN layer's (forward,
    backward), and the rest of the model's (embedding, final norm, loss), forward and backward."""

    moe: tuple[int, int]
    dense: tuple[int, int]
    edges: tuple[int, int]


NO_KERNELS = KernelCounts((0, 0), (0, 0), (0, 0))


def counted_kernels(cfg) -> KernelCounts:
    """`KernelCounts` of a model config (`MoEConfig`), counted on its shrunken copy (`_shrunk`; cached by it)."""
    small = _shrunk(cfg)
    return _count(json.dumps(small, sort_keys=True))


def _shrunk(cfg) -> dict:
    """The config's structure (experts, top-k, routing, norms, biases, MLA, dense layers) at widths of a few
    elements: the kernels it launches are the same, the work is nothing."""
    d = config_fields(cfg)
    heads = 2
    kv = 1 if cfg.num_key_value_heads < cfg.num_attention_heads else 2
    d.update(vocab_size=32, hidden_size=16, num_attention_heads=heads, num_key_value_heads=kv, head_dim=8,
             intermediate_size=16, moe_intermediate_size=8 if cfg.moe_intermediate_size else None)
    if cfg.shared_width:
        d.update(shared_expert_intermediate_size=8 if cfg.shared_expert_intermediate_size else None)
    if cfg.mla:
        d.update(q_lora_rank=8 if cfg.q_lora_rank else None, kv_lora_rank=8, qk_nope_head_dim=8,
                 qk_rope_head_dim=4, v_head_dim=8, head_dim=4)
    return d


def config_fields(cfg) -> dict:
    """A config's one-layer structure as `MoEConfig(**fields)` takes it (transformers' bookkeeping keys left out;
    one layer, dense first where the model has dense layers, no cache or router logits): what `_count` runs."""
    d = {k: v for k, v in cfg.to_dict().items()
         if k not in ("architectures", "transformers_version", "model_type", "torch_dtype", "dtype")}
    d.update(num_hidden_layers=1, dense_layers=[0] if cfg.dense_layers else [], use_cache=False,
             output_router_logits=False)
    return d


@functools.lru_cache(maxsize=64)
def _count(config_json: str) -> KernelCounts:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from .. import grouped_ffn
    from ..configuration import MoEConfig
    from ..modeling import MoEForCausalLM

    class Counting(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.kernels = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.kernels += name not in NO_KERNEL and name not in GEMMS
            return func(*args, **(kwargs or {}))

    def run(layers: int, dense: bool = False) -> tuple[int, int]:
        config = MoEConfig(**{**json.loads(config_json), "num_hidden_layers": layers,
                              "dense_layers": [0] if dense else []})
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = MoEForCausalLM(config).train()
            ids = torch.randint(0, config.vocab_size, (1, 16))
        with grouped_ffn.force_backend("grouped_mm"):
            with Counting() as forward:
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            with Counting() as backward:
                loss.backward()
        return forward.kernels, backward.kernels

    one, two = run(1), run(2)  # one MoE layer, two
    moe = tuple(b - a for a, b in zip(one, two))
    edges = tuple(a - m for a, m in zip(one, moe))
    dense = tuple(b - a for a, b in zip(one, run(2, dense=True))) if json.loads(config_json)["dense_layers"] else (0, 0)
    return KernelCounts(moe, dense, edges)
