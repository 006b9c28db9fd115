"""Model states per rank: parameters, gradients, optimizer states, as DeepSpeed 0.19 holds them for this project.

Which parameters a rank holds (stage s of pp, one of tp tensor-parallel and ep expert-parallel ranks):
`shapes.rank_params` (attention split over tp, everything else dense replicated, E/ep experts per layer).
Layers are spread over stages by DeepSpeed's `partition_balanced` on the decoder layers (`type:DecoderLayerPipe`),
re-implemented here without importing DeepSpeed (a test checks the two agree).

Bytes per parameter, b = 2 (bf16/fp16) or 4 (fp32), Adam's two moments and the master weights in fp32. ZeRO splits
over N: N_dense = dp for dense parameters, N_expert = dp / ep (the expert-data-parallel group) for expert
parameters; "P/N" below means P_dense/N_dense + P_expert/N_expert.

    optimizer class (DeepSpeed picks it)        params   grads                        master + Adam
    ZeRO-0, fp32: torch AdamW, no wrapper       4P       4P                           0 + 8P
    ZeRO-0, bf16/fp16: FP16(_Unfused)_Optimizer 2P       2P                           4P + 8P (not partitioned)
    ZeRO-0, bf16, pp > 1: BF16_Optimizer        2P       2P (accumulated in bf16)     4P/N + 8P/N
    ZeRO-1: DeepSpeedZeroOptimizer              bP       bP (full until reduced,      4P/N + 8P/N  (also in fp32:
                                                         also with one micro-batch)       the master is a clone)
    ZeRO-2: DeepSpeedZeroOptimizer              bP       bP/N (+ the bucket)          4P/N + 8P/N

`ds_config.py` sets no `data_types.grad_accum_dtype`, so gradients accumulate in the parameters' dtype. Checked
against the tensors of live engines on CPU ranks (fp32; ZeRO 0/1/2 on dp 1 and 2, ep 2, pp 2, pp 2 x ep 2) by
`benchmarks/memory_accuracy.py` and `tests/test_estimate_memory.py`; the bf16/fp16 rows are read from DeepSpeed
0.19's optimizers (a bf16 engine on CPU showed the same structure: bf16 flat parameters and gradients, a 1 GB bf16
bucket, fp32 master and moments). DeepSpeed pads each flat group to a multiple of (2 * dp) elements and each
parameter to 16 bytes; that padding (a few elements per tensor, < 0.01% measured) is not modelled.

Transient buffers (stated, configurable assumptions, `Assumptions`):
    gradient bucket   ZeRO-1/2 reduce gradients through `reduce_bucket_size` elements (5e8 by default, in the
                      gradient dtype: 1 GB in bf16, 2 GB in fp32), allocated for the backward pass whatever the
                      model size (measured), twice with `overlap_comm`. ZeRO-0 all-reduces after backward (not at
                      the activation peak), through a flat copy of up to that many elements when dp > 1.
    optimizer step    mixed precision: the fp32 copy of this rank's gradient partition (4P/N, 4P at ZeRO-0);
                      torch's foreach AdamW on GPUs: one fp32 temporary the size of the partition (sqrt of v).
    reserve           CUDA context, cuBLAS workspaces and communicator buffers outside PyTorch's allocator, and
                      the caching allocator's fragmentation as a fraction of what is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..units import FP32
from .shapes import RankParams

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Assumptions:
    """The figures this estimate cannot read from the recipe; every report prints them."""

    reduce_bucket_elements: int = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default
    overlap_comm: bool = False  # DeepSpeed's default for ZeRO-1/2
    reserve_bytes: int = 1_500_000_000  # CUDA context + cuBLAS workspace + NCCL communicators (outside the allocator)
    fragmentation: float = 0.05  # caching-allocator overhead, a fraction of the allocated peak
    imbalance: float = 3.0  # busiest expert's load over the mean, early in training (dropless, ep > 1)
    foreach_adam_temporary: bool = True  # torch AdamW's foreach path on GPUs allocates one partition-sized temp


def partition_balanced(weights: list[int], parts: int) -> list[int]:
    """DeepSpeed's `runtime.utils.partition_balanced`: boundaries of `parts` contiguous pieces minimising the
    spread between the heaviest and the lightest piece (dynamic programme; ties go to the latest split)."""
    n = len(weights)
    if n <= parts:
        # partition_uniform: one item per part, the rest empty
        return [min(i, n) for i in range(parts + 1)]
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = math.inf
    best_max = [[inf] * (parts + 1) for _ in range(n + 1)]
    best_min = [[inf] * (parts + 1) for _ in range(n + 1)]
    cost = [[inf] * (parts + 1) for _ in range(n + 1)]
    split = [[0] * (parts + 1) for _ in range(n + 1)]
    best_max[0][0] = cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, parts) + 1):
            for k in range(i):
                piece = prefix[i] - prefix[k]
                hi, lo = max(best_max[k][j - 1], piece), min(best_min[k][j - 1], piece)
                if cost[i][j] >= hi - lo:
                    cost[i][j], best_max[i][j], best_min[i][j], split[i][j] = hi - lo, hi, lo, k
    bounds = [n]
    for j in range(parts, 0, -1):
        bounds.append(split[bounds[-1]][j])
    return bounds[::-1]


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Decoder layers per pipeline stage, as `PipelineModule(partition_method="type:DecoderLayerPipe")` splits
    [embedding, layer x L, head]."""
    if pp == 1:
        return [num_layers]
    weights = [0] + [1] * num_layers + [0]
    bounds = partition_balanced(weights, pp)
    return [sum(weights[bounds[s]:bounds[s + 1]]) for s in range(pp)]


@dataclass(frozen=True)
class ModelStates:
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int  # fp32 master weights (where separate) + Adam moments
    bucket_bytes: int  # gradient reduction buckets alive during backward
    step_transient_bytes: int  # alive during the optimizer step only (activations freed by then)
    optimizer_kind: str


def optimizer_kind(precision: str, zero_stage: int, pp: int) -> str:
    if zero_stage >= 1:
        return "DeepSpeedZeroOptimizer"
    if precision == "fp32":
        return "torch AdamW (no wrapper)"
    if precision == "bf16" and pp > 1:
        return "BF16_Optimizer"
    return "FP16_UnfusedOptimizer" if precision == "bf16" else "FP16_Optimizer"


def model_states(params: RankParams, *, precision: str, zero_stage: int, dp: int, ep: int, pp: int,
                 assumptions: Assumptions = Assumptions()) -> ModelStates:
    """Bytes of one rank's model states during a backward pass (the activation peak) and at the optimizer step."""
    if dp % ep:
        raise ValueError(f"ep={ep} must divide dp={dp}")
    b = PRECISION_BYTES[precision]
    P = params.total
    partition = params.dense / dp + params.expert / (dp // ep)  # what ZeRO leaves on this rank
    kind = optimizer_kind(precision, zero_stage, pp)
    bucket = 0
    if kind == "torch AdamW (no wrapper)":
        grads, optimizer = b * P, 2 * FP32 * P
        step = b * min(P, assumptions.reduce_bucket_elements) if dp > 1 else 0
        adam_elements = P
    elif kind in ("FP16_UnfusedOptimizer", "FP16_Optimizer"):
        grads, optimizer = b * P, 3 * FP32 * P
        step, adam_elements = FP32 * P, P
    elif kind == "BF16_Optimizer":
        grads, optimizer = b * P, 3 * FP32 * partition
        step, adam_elements = FP32 * partition, partition
    else:
        grads = b * P if zero_stage == 1 else b * partition  # ZeRO-1 keeps full gradients through backward
        optimizer = 3 * FP32 * partition
        bucket = b * assumptions.reduce_bucket_elements * (2 if assumptions.overlap_comm else 1)
        step = FP32 * partition if b != FP32 else 0
        adam_elements = partition
    if assumptions.foreach_adam_temporary:
        step += FP32 * adam_elements
    return ModelStates(params_bytes=b * P, grads_bytes=math.ceil(grads), optimizer_bytes=math.ceil(optimizer),
                       bucket_bytes=bucket, step_transient_bytes=math.ceil(step), optimizer_kind=kind)
