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
    ZeRO-0, bf16/fp16: FP16_UnfusedOptimizer    2P       2P                           4P + 8P (not partitioned)
    ZeRO-0, bf16, pp > 1: BF16_Optimizer        2P       2P + 2P (bf16 "fp32" buffer) 4P/N + 8P/N
    ZeRO-1, bf16: BF16_Optimizer                2P       2P + 4P (fp32 buffer, full)  4P/N + 8P/N
    ZeRO-1, fp32/fp16: DeepSpeedZeroOptimizer   bP       bP (full until reduced,      4P/N + 8P/N  (also in fp32:
                                                         also with one micro-batch)       the master is a clone)
    ZeRO-2: DeepSpeedZeroOptimizer              bP       aP/N (+ the bucket, in b;    4P/N + 8P/N
                                                         a = b: whole tensors, below)
    ZeRO-3: DeepSpeedZeroOptimizer_Stage3       bP/N + bW    aP/N (+ the bucket, in b)    4P/N + 8P/N  (a separate
                                                                                          fp32 master in fp32 too)

a is the bytes of the accumulation dtype, `grad_accum_dtype`: `train/ds_config.py` sets
`data_types.grad_accum_dtype: fp32` for bf16 at ZeRO 1-3 (a = 4; DeepSpeed refuses it at ZeRO-0), else a = b.
Where each fp32 accumulation buffer comes from (DeepSpeed 0.19.8): ZeRO-1 bf16 is `BF16_Optimizer` (engine.py
`_do_optimizer_sanity_check`), whose `fp32_groups_gradients_flat` is `zeros_like(bf16_groups_flat[i],
dtype=grad_acc_dtype)`, the whole flat group on every rank, beside the bf16 `.grad` of the parameters it adds in
after every backward (`update_hp_grads`); it all-reduces that buffer (`get_grads_for_reduction`) after the boundary
backward through flat copies of up to `reduce_bucket_size` elements, and steps on a view of its partition (no fp32
copy; a bf16 buffer is copied to fp32 at the step, 4P/N). ZeRO-2: the owned partition is one fp32 buffer
(`_build_compact_grad_partition_buffer`, `partition_size` elements) that the bf16 bucket's reductions are added
into, and the step flattens it with no copy. ZeRO-3: `grad_partitions_flat_buffer` in `gradient_accumulation_dtype`.
ZeRO-2 where a = b (fp32, fp16: no compact buffer) holds more than P/N: `copy_grads_in_partition` moves each
reduced gradient into `grads_in_partition`, sized by the sum of the numels of `params_in_partition` (every group),
the parameters that overlap this rank's partition, each whole. A tensor across a partition boundary is held whole by
both ranks: `zero2_gradient_elements` walks DeepSpeed's flat groups tensor by tensor (`zero_flat_groups`) and
prices the busiest rank of the stage (a stacked expert tensor [E, 2I, D] can outweigh the partition itself).
DeepSpeed pads each flat group to a multiple of (2 * dp) elements and each parameter to 16 bytes (ZeRO-3: to a
multiple of N); that padding (a few elements per tensor, < 0.01% measured) is not modelled. AutoEP's experts
(`AutoEPMoELayer`'s w1, w2, w3) are expert parameters like the legacy layer's: partitioned over dp/ep.

ZeRO-3 (`runtime/zero/stage3.py`, `partition_parameters.py`, `partitioned_param_coordinator.py`): every parameter
lives as its 1/N partition in one flat buffer (the P/N above, dense over dp, experts over the expert-data-parallel
group); W is what the rank holds whole beside it, in elements (`zero3_residency`), only where the group has N > 1
ranks (with N = 1 the gathered parameter is its partition):
    persistent   each tensor of at most `stage3_param_persistence_threshold` elements (`ds_persist`) stays
                 gathered from its first use on (tensor by tensor, `traffic.persistent_parts`);
    kept         a partitioned tensor gathered in the forward is not released where DeepSpeed's trace uses it
                 again within `stage3_max_reuse_distance` elements, or where the prefetch look-ahead
                 (`stage3_prefetch_bucket_size` elements) already reached its backward use
                 (`__params_to_release`): `traffic.zero3_gathers` says which (decoder layer j of a stage's L is
                 used again after (2 + ckpt) (L-1-j) n_layer + 2 n_head elements), so at the start of the backward
                 (the activation peak) the stage's last layers, the LM head, and the embedding where everything
                 fits the distance, are held whole; the prefetch's share under `stage3_max_live_parameters`
                 (`zero3_residency`).
Gradients are reduced into a flat partition buffer (`grad_partitions_flat_buffer`, b*P/N) through an IPG bucket
of `reduce_bucket_size` elements allocated at engine start and alive throughout (the step included); the step
flattens each parameter group's gradient partition into an fp32 copy (4*P/N). W counts in the parameters (the step
releases the gathered tensors, so it overstates the step's figure by the gathered part).

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

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..units import FP32
from .shapes import RankParams, mla_tensors
from .traffic import Zero3Settings, zero3_gathers

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
    autoep_triton_kernels: bool = True  # AutoEP's permute and SwiGLU run DeepSpeed's Triton kernels (CUDA)
    # ZeRO-3, DeepSpeed's zero_optimization defaults (runtime/zero/config.py; train/ds_config.py sets none)
    zero3_param_persistence_threshold: int = 100_000  # stage3_param_persistence_threshold: tensors kept whole
    zero3_max_reuse_distance: int = 1_000_000_000  # stage3_max_reuse_distance: not released if reused within
    zero3_prefetch_bucket_elements: int = 50_000_000  # stage3_prefetch_bucket_size: gathered ahead of use
    zero3_max_live_parameters: int = 1_000_000_000  # stage3_max_live_parameters: cap on gathered elements


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


def stage_ranges(num_layers: int, pp: int) -> list[range]:
    """The decoder layers of each pipeline stage (their indices), as
    `PipelineModule(partition_method="type:DecoderLayerPipe")` splits [embedding, layer x L, head]."""
    if pp == 1:
        return [range(num_layers)]
    weights = [0] + [1] * num_layers + [0]
    bounds = partition_balanced(weights, pp)
    counts = [sum(weights[bounds[s]:bounds[s + 1]]) for s in range(pp)]
    starts = [sum(counts[:s]) for s in range(pp)]
    return [range(start, start + n) for start, n in zip(starts, counts)]


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Decoder layers per pipeline stage (`stage_ranges`' lengths)."""
    return [len(r) for r in stage_ranges(num_layers, pp)]


@dataclass(frozen=True)
class ModelStates:
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int  # fp32 master weights (where separate) + Adam moments
    bucket_bytes: int  # gradient reduction buckets alive during backward
    step_transient_bytes: int  # alive during the optimizer step only (activations freed by then)
    optimizer_kind: str


@dataclass(frozen=True)
class Zero3Residency:
    """Elements a ZeRO-3 rank holds whole beside its partitions at the activation peak (module docstring)."""

    persistent_dense: float = 0
    persistent_expert: float = 0
    gathered_dense: float = 0  # gathered in the forward and kept to the backward (reuse distance, prefetch)
    gathered_expert: float = 0


def zero3_settings(assumptions: Assumptions) -> Zero3Settings:
    """The stage-3 settings of `assumptions` in the form the time model's `traffic.zero3_gathers` reads."""
    return Zero3Settings(persistence_threshold=assumptions.zero3_param_persistence_threshold,
                         max_reuse_distance=assumptions.zero3_max_reuse_distance,
                         prefetch_bucket_size=assumptions.zero3_prefetch_bucket_elements)


def zero3_residency(model, *, layers: int, first: bool, last: bool, tp: int, ep: int, autoep: bool,
                    checkpointing: bool, assumptions: Assumptions = Assumptions()) -> Zero3Residency:
    """What one ZeRO-3 rank of a stage holds whole beside its partitions at the start of the backward (module
    docstring), in elements, before the group-size test of `model_states`: the persistent tensors, and the
    partitioned ones gathered in the forward and not released before their backward use. The latter are what
    `traffic.zero3_gathers` (the one home of DeepSpeed's release rule) gathers in the forward but not again in the
    backward; the share kept by the prefetch look-ahead alone is capped by `stage3_max_live_parameters`, which
    throttles the prefetch only (`fetch_sub_module`: at most max_live - available elements ahead)."""
    shape = dict(layers=layers, first=first, last=last, tp=tp, ep=ep, ckpt=checkpointing, autoep=autoep)
    settings = zero3_settings(assumptions)
    g = zero3_gathers(model, **shape, zero3=settings)
    by_reuse = zero3_gathers(model, **shape, zero3=dataclasses.replace(settings, prefetch_bucket_size=0))
    kept_dense, kept_expert = g.forward_dense - g.backward_dense, g.forward_expert - g.backward_expert
    reuse_dense = by_reuse.forward_dense - by_reuse.backward_dense
    reuse_expert = by_reuse.forward_expert - by_reuse.backward_expert
    persistent = g.persistent_dense + g.persistent_expert
    room = max(assumptions.zero3_max_live_parameters - persistent - reuse_dense - reuse_expert, 0)
    ahead_dense, ahead_expert = kept_dense - reuse_dense, kept_expert - reuse_expert
    scale = min(1.0, room / max(ahead_dense + ahead_expert, 1))
    return Zero3Residency(persistent_dense=float(g.persistent_dense), persistent_expert=float(g.persistent_expert),
                          gathered_dense=float(reuse_dense + scale * ahead_dense),
                          gathered_expert=float(reuse_expert + scale * ahead_expert))


# deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer's default: expert groups are cut into
# parameter groups of at most this many elements, each flattened and partitioned on its own
MOE_MAX_GROUP_ELEMENTS = 178_956_971


def _mlp_tensors(model, width: int) -> list[int]:
    """`MoEMLP`'s weights in registration order: gate_proj (silu), up_proj [width, D], down_proj [D, width]."""
    return [width * model.hidden_size] * (3 if model.hidden_act == "silu" else 2)


Tensor = tuple[int, bool, bool]  # (numel, ndim >= 2: weight-decayed, an expert tensor)


def _layer_tensors(model, layer: int, *, tp: int, ep: int, experts: str) -> tuple[list[Tensor], list[Tensor]]:
    """One decoder layer's parameters on a rank in the module's registration order (`modeling.MoEDecoderLayer`;
    tp: `TensorParallelAttention`'s slices), and those AutoEP's conversion puts in their place. `experts`: "stacked"
    (`MoEExperts`: [E, 2I, D] or [E, I, D], then [E, D, I]), "legacy" (DeepSpeed's MoE layer: E/ep `ExpertFFN`s
    of [2I, D] or [I, D] and [D, I]) or "autoep" (the router [E, D] and w1, w2, w3 [E/ep, I, D] of AutoEP's layer,
    which `deepspeed.initialize` builds after the optimizer's groups were listed: its
    `_remap_param_groups_after_module_replacement` drops the block's old tensors and appends these to the group)."""
    D, d = model.hidden_size, model.head_dim
    q, kv = model.num_attention_heads * d // tp, model.num_key_value_heads * d // tp
    out = [(D, False, False)]  # input_layernorm
    if getattr(model, "mla", False):
        # `shapes.mla_tensors` (no expert tensor), then post_attention_layernorm
        out += [(n, matrix, False) for n, matrix, _ in mla_tensors(model, tp)] + [(D, False, False)]
    else:
        for rows in (q, kv, kv):  # q, k, v: weight, bias
            out += [(rows * D, True, False)] + [(rows, False, False)] * bool(model.attention_bias)
        out += [(D * q, True, False)] + [(D, False, False)] * bool(model.attention_out_bias)
        norms = {None: (), "head": (d, d), "projection": (q, kv)}[model.qk_norm]
        out += [(n, False, False) for n in norms] + [(D, False, False)]  # q/k norms, post_attention_layernorm
    if not model.is_moe_layer(layer):
        return out + [(n, True, False) for n in _mlp_tensors(model, model.intermediate_size)], []
    E, I = model.num_local_experts, model.expert_width
    gated = model.hidden_act == "silu"
    shared = []
    if model.shared_width:
        shared += [(n, True, False) for n in _mlp_tensors(model, model.shared_width)]
        shared += [(D, True, False)] * bool(model.shared_expert_gate)  # [1, D]
    if experts == "autoep":  # AutoEP's router and experts: their place is taken after the stage's last tensor;
        # the shared experts are the block's own modules, kept where they were
        return out + shared, [(E * D, True, False)] + [(E // ep * I * D, True, True)] * 3
    out.append((E * D, True, False))  # the router's weight (a score bias is a buffer)
    if experts == "legacy":
        out += [(n, True, True) for _ in range(E // ep) for n in ((2 if gated else 1) * I * D, D * I)]
    else:
        out += [((2 if gated else 1) * E * I * D, True, True), (E * D * I, True, True)]
    return out + shared, []


def zero_flat_groups(model, *, layers: range, first: bool, last: bool, tp: int, ep: int,
                     autoep: bool) -> list[tuple[list[int], bool]]:
    """DeepSpeed 0.19's ZeRO-1/2 parameter groups of one rank of a stage, each (its tensors' numels in flat order,
    whether it is an expert group: partitioned over dp/ep, else over dp). `train/engine.param_groups` builds decay
    (ndim >= 2) then no-decay, each in `model.parameters()` order (embedding, layers, final norm, LM head; AutoEP's
    layers' tensors after those, `_layer_tensors`); where the MoE layers are DeepSpeed's (the legacy layer at ep > 1,
    AutoEP) the expert tensors leave them for expert groups appended after, cut at `MOE_MAX_GROUP_ELEMENTS`
    (`split_params_into_different_moe_groups_for_optimizer`)."""
    deepspeed_moe = autoep or ep > 1
    experts = "autoep" if autoep else "legacy" if ep > 1 else "stacked"
    tensors = [(model.vocab_size * model.hidden_size, True, False)] if first else []
    replaced: list[Tensor] = []
    for layer in layers:
        kept, new = _layer_tensors(model, layer, tp=tp, ep=ep, experts=experts)
        tensors += kept
        replaced += new
    if last:
        tensors.append((model.hidden_size, False, False))
        if not (model.tie_word_embeddings and first):
            tensors.append((model.vocab_size * model.hidden_size, True, False))
    tensors += replaced
    groups: list[tuple[list[int], bool]] = []
    moe: list[list[int]] = []
    for decay in (True, False):
        dense = [n for n, two_d, expert in tensors if two_d == decay and not (expert and deepspeed_moe)]
        routed = [n for n, two_d, expert in tensors if two_d == decay and expert and deepspeed_moe]
        if dense:
            groups.append((dense, False))
        if routed:
            chunks, size = [[]], 0
            for n in routed:
                if size + n <= MOE_MAX_GROUP_ELEMENTS:
                    chunks[-1].append(n)
                    size += n
                else:
                    chunks.append([n])
                    size = n
            moe += chunks
    return groups + [(chunk, True) for chunk in moe if chunk]


def _held_by_rank(numels: list[int], ranks: int) -> np.ndarray:
    """Elements of the whole tensors overlapping each rank's partition of one flat group (`get_partition_info`):
    the group padded to a multiple of 2 * ranks (`nccl_start_alignment_factor`), split evenly."""
    ends = np.cumsum(np.asarray(numels, dtype=np.int64))
    starts = ends - np.asarray(numels, dtype=np.int64)
    size = -(-int(ends[-1]) // (2 * ranks)) * 2
    lo = np.arange(ranks, dtype=np.int64) * size
    hi = lo + size
    first = np.searchsorted(ends, lo, side="right")  # the first tensor ending after the partition's start
    stop = np.searchsorted(starts, hi, side="left")  # past the last tensor starting before its end
    held = np.where(stop > first, ends[np.maximum(stop - 1, 0)] - starts[np.minimum(first, len(numels) - 1)], 0)
    return held


def zero2_gradient_elements(groups: list[tuple[list[int], bool]], *, dp: int, ep: int) -> int:
    """The elements of ZeRO-2's `grads_in_partition` (a = b, module docstring) on the busiest data-parallel rank of a
    stage: over every group (`zero_flat_groups`), the whole tensors overlapping the rank's partition. Data-parallel
    rank r is r of the dense groups and r // ep of the expert groups (DeepSpeed's expert-data-parallel groups take
    every ep-th rank)."""
    total = np.zeros(dp, dtype=np.int64)
    rank = np.arange(dp)
    for numels, expert in groups:
        ranks = dp // ep if expert else dp
        total += _held_by_rank(numels, ranks)[rank // ep if expert else rank]
    return int(total.max())


def grad_accum_dtype(precision: str, zero_stage: int) -> str:
    """The dtype gradients are summed in across micro-batches, the one home of the rule `train/ds_config.py` writes
    as `data_types.grad_accum_dtype`: fp32 for bf16 wherever DeepSpeed 0.19.8 takes it (ZeRO 1-3, any pp), else
    the parameters' dtype.

    bf16 has an 8-bit mantissa: summing m micro-batches' gradients in bf16 rounds every partial sum (relative error
    up to ~m * 2^-9). Where it is read (deepspeed/runtime/engine.py): `get_data_types` -> `_do_optimizer_sanity_check`
    picks `BF16_Optimizer(grad_acc_dtype=fp32)` at ZeRO-1 (a full fp32 gradient buffer), and
    `DeepSpeedZeroOptimizer`/`DeepSpeedZeroOptimizer_Stage3(gradient_accumulation_dtype=fp32)` at ZeRO-2/3 (an fp32
    gradient partition). At ZeRO-0 that check raises `NotImplementedError("unsupported mix of model_dtype and
    grad_accum_dtype")` for every pp, so bf16 without ZeRO keeps accumulating in bf16 (the autograd `.grad` of the
    bf16 parameters under `FP16_UnfusedOptimizer`, pp 1; `BF16_Optimizer`'s bf16 buffer, pp > 1). fp16 keeps its
    loss-scaled fp16 accumulation (DeepSpeed's default)."""
    return "fp32" if precision == "bf16" and zero_stage >= 1 else precision


def optimizer_kind(precision: str, zero_stage: int, pp: int, grad_accum: str | None = None) -> str:
    """The optimizer wrapper DeepSpeed 0.19.8's `_configure_optimizer` builds for this project's config (torch
    AdamW as the basic optimizer, which is not FusedAdam, so the fp16 wrapper is the unfused one); `grad_accum` as
    in `model_states`."""
    grad_accum = grad_accum or grad_accum_dtype(precision, zero_stage)
    if zero_stage == 3:
        return "DeepSpeedZeroOptimizer_Stage3"
    if zero_stage == 1 and precision == "bf16" and grad_accum == "fp32":
        return "BF16_Optimizer"  # `_do_optimizer_sanity_check`: bf16 + fp32 accumulation + ZeRO-1
    if zero_stage >= 1:
        return "DeepSpeedZeroOptimizer"
    if precision == "fp32":
        return "torch AdamW (no wrapper)"
    if precision == "bf16" and pp > 1:
        return "BF16_Optimizer"
    return "FP16_UnfusedOptimizer"


def model_states(params: RankParams, *, precision: str, zero_stage: int, dp: int, ep: int, pp: int,
                 assumptions: Assumptions = Assumptions(), zero3: Zero3Residency | None = None,
                 grad_accum: str | None = None, zero2_gradients: int | None = None) -> ModelStates:
    """Bytes of one rank's model states during a backward pass (the activation peak) and at the optimizer step.
    ZeRO-3: `zero3` is what the rank holds whole beside its partitions (`zero3_residency`); None counts the
    partitions alone (a lower bound). `grad_accum`: the accumulation dtype (default: this project's,
    `grad_accum_dtype`; the precision itself prices DeepSpeed's default, where ZeRO-1 bf16 is DeepSpeedZeroOptimizer).
    `zero2_gradients`: ZeRO-2's gradient elements where a = b, whole tensors (`zero2_gradient_elements`); None counts
    the partition alone (a lower bound)."""
    if dp % ep:
        raise ValueError(f"ep={ep} must divide dp={dp}")
    b = PRECISION_BYTES[precision]
    grad_accum = grad_accum or grad_accum_dtype(precision, zero_stage)
    a = PRECISION_BYTES[grad_accum]  # what gradients are summed in (docstring table)
    P = params.total
    partition = params.dense / dp + params.expert / (dp // ep)  # what ZeRO leaves on this rank
    kind = optimizer_kind(precision, zero_stage, pp, grad_accum)
    bucket = 0
    params_bytes = b * P
    if kind == "DeepSpeedZeroOptimizer_Stage3":
        z = zero3 or Zero3Residency()
        whole = ((z.persistent_dense + z.gathered_dense) * (dp > 1)
                 + (z.persistent_expert + z.gathered_expert) * (dp // ep > 1))  # N = 1: the partition is whole
        params_bytes = b * (partition + whole)
        grads, optimizer = a * partition, 3 * FP32 * partition
        bucket = b * assumptions.reduce_bucket_elements  # allocated at engine start, alive at the step as well
        step, adam_elements = FP32 * partition + bucket, partition
    elif kind == "torch AdamW (no wrapper)":
        grads, optimizer = b * P, 2 * FP32 * P
        step = b * min(P, assumptions.reduce_bucket_elements) if dp > 1 else 0
        adam_elements = P
    elif kind in ("FP16_UnfusedOptimizer", "FP16_Optimizer"):
        grads, optimizer = b * P, 3 * FP32 * P
        step, adam_elements = FP32 * P, P
    elif kind == "BF16_Optimizer":
        grads, optimizer = b * P + a * P, 3 * FP32 * partition  # the parameters' .grad and the whole buffer
        allreduce = a * min(P, assumptions.reduce_bucket_elements) if dp > 1 else 0
        step, adam_elements = max(FP32 * partition if a != FP32 else 0, allreduce), partition
    else:
        grads = b * P if zero_stage == 1 else a * partition  # ZeRO-1 keeps full gradients through backward
        if zero_stage == 2 and a == b and zero2_gradients is not None:  # no compact buffer: whole tensors
            grads = b * zero2_gradients
        optimizer = 3 * FP32 * partition
        bucket = b * assumptions.reduce_bucket_elements * (2 if assumptions.overlap_comm else 1)
        step = FP32 * partition if a != FP32 else 0
        adam_elements = partition
    if assumptions.foreach_adam_temporary:
        step += FP32 * adam_elements
    return ModelStates(params_bytes=math.ceil(params_bytes), grads_bytes=math.ceil(grads),
                       optimizer_bytes=math.ceil(optimizer), bucket_bytes=bucket,
                       step_transient_bytes=math.ceil(step), optimizer_kind=kind)
