"""What one rank's experts run and what its collectives move, per MoE backend and ZeRO stage: the volumes the time
model (perf.py) prices. Numbers or numpy arrays of strategies alike (the planner's grid); `autoep` is a bool or a 0/1
array. Symbols as in shapes.py: T tokens of a micro-batch on a rank, E experts, k top-k, D hidden, I expert width,
g matrices per expert, b bytes of the compute dtype, e = ep, s the busiest expert's load over the mean (`imbalance`).

Expert rows (per layer and micro-batch on one rank)
    legacy  `shapes.routed_rows`: ep = 1 the model's own block, the T*k routed copies; ep > 1 DeepSpeed's MoE layer,
            every expert's buffer at the busiest expert's depth, E*C/tp rows, computed and sent whole
    autoep  DeepSpeed's AutoEPMoELayer (`deepspeed/module_inject/auto_ep_layer.py`, `_forward`): each rank sends its
            T*k routed copies through a variable-split all-to-all (`_AllToAllV`, splits from the counts), so only
            routed rows travel; the receiving rank groups them by local expert (`permute_by_local_expert`) and
            `generate_permute_indices` (`deepspeed/moe/ep_kernels.py`) rounds every local expert's rows up to a
            multiple of TOKEN_GROUP_ALIGN_SIZE_M = 8, at least 8, for the grouped GEMM. The rows reaching the
            busiest rank, with the busiest expert at s times the mean over the group's e*T tokens (at most e*T: an
            expert takes a token once) and the group's other E - 1 experts sharing the remaining routed copies
            evenly (this module's assumption; s = 1 is balanced, and with one expert per rank it is DeepSpeed's
            legacy depth less the padding):
                hot = min(s * e*T*k/E, e*T), rest = (e*T*k - hot) / (E - 1)
                received = hot + (E/e - 1) * rest            (rows through the all-to-all, = T*k when balanced)
                computed = r8(hot) + (E/e - 1) * r8(rest)    r8(x) = max(8, 8 * ceil(x / 8))
            The all-to-all moves `received` rows each way (dispatch, then combine); the grouped GEMMs run `computed`.

Data-parallel collectives per optimizer step (link bytes per rank: a ring all-reduce moves 2 (N-1)/N of the buffer,
reduce-scatter or all-gather (N-1)/N, Patarasuk & Yuan 2009), P_dense over N = dp, P_expert over N = dp/e, m
micro-batches per step. When DeepSpeed 0.19 communicates (deepspeed/runtime/engine.py `allreduce_gradients`,
runtime/zero/stage_1_and_2.py `reduce_ready_partitions_and_remove_grads`, runtime/zero/stage3.py):
    ZeRO-0  gradients all-reduced once, at the accumulation boundary                       2 (N-1)/N b P
    ZeRO-1  gradients reduce-scattered at the boundary, updated b-byte weights all-gathered 2 (N-1)/N b P
    ZeRO-2  gradients reduce-scattered after every micro-batch's backward (partitioned
            gradients), updated weights all-gathered after the step                    (m + 1) (N-1)/N b P
    ZeRO-3  gradients reduce-scattered after every micro-batch's backward                  m (N-1)/N b P
            and the parameters all-gathered before use (`PartitionedParameterCoordinator.fetch_sub_module`),
            per micro-batch (the trace restarts every forward, `reset_step`):
            m (N-1)/N b (P_gathered + P_regathered) + (N-1)/N b P_persistent
            P_gathered   every tensor of more than `persistence_threshold` elements, in the forward; smaller ones
                         stay whole (`ds_persist`: never gathered, re-gathered once after the step's update)
            P_regathered the parts released after their forward and gathered again for the backward (or its
                         recompute). A part is kept when either (DeepSpeed `__params_to_release`):
                reuse      its next use lies within `max_reuse_distance` elements of the parameters fetched in trace
                           order: for decoder layer j of a stage's L (i = L-1-j later layers) the MoE part is next
                           used after (2 + ckpt) i n + 2 h (+ the attention's a with recompute), the attention part
                           after (2 + ckpt) i n + 2 h + (2 - ckpt) m (n = a + m: a layer's whole parameters on the
                           rank, ds_numel; h the final norm and LM head);
                lookahead  the prefetcher (up to `prefetch_bucket_size` a fetch) already walked the trace past its
                           next use, which it does while everything gathered stays under `max_live_parameters`:
                           the gathered (partitioned) elements from the part to the head, m_g + i n_g + h_g (MoE) or
                           (i + 1) n_g + h_g (attention) below it. The per-fetch bucket is taken to be no limit
                           (it is 5e7 elements for every module's fetch).
            The embedding counts as i = L. Checked against a live ZeRO-3 engine (fp32 CPU ranks, legacy ep 1 and
            AutoEP ep 2, with and without recompute, each rule alone) by tests/test_perf.py: the elements gathered
            per micro-batch (forward + backward), dense and expert, and those kept whole, exactly.

The families' blocks (`perf.Shape.rows`: an MoE layer's and a dense layer's `shapes.LayerShape` of `layer_table`): a
stage's parameters are its MoE layers' rows and its dense layers' (`stage_params`, = `shapes.rank_params` of its layer
range), so the reductions above move each stage's own parameters. ZeRO-3 meets an MoE layer as attention (with its
biases and q/k norms), then post-attention norm + router + shared experts (their matrices and gate kept whole by the
same threshold, tensor by tensor), then experts; a dense layer as attention, then norm + FFN (g matrices of D*I), no
experts. Its release rule is the one above with every layer of the stage at an MoE layer's size (n, m), the dense
layers taken to lead the stage (GLM-4.5, DeepSeek: the first layers), so they are the first gathered again: exact
for the forward's gathers and the kept-whole tensors, an approximation of which parts the backward gathers again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .shapes import LayerShape, RankParams, attention_params, dims, expert_params, routed_rows

ALIGN_ROWS = 8  # deepspeed.moe.ep_kernels.TOKEN_GROUP_ALIGN_SIZE_M: rows per expert round up to a multiple, min 8


@dataclass(frozen=True)
class Zero3Settings:
    """DeepSpeed's stage-3 settings the gathers depend on, at DeepSpeed 0.19's defaults (train/ds_config.py sets
    none): `stage3_param_persistence_threshold`, `stage3_max_reuse_distance`, `stage3_prefetch_bucket_size`,
    `stage3_max_live_parameters` (runtime/zero/config.py). The memory estimator's `Assumptions` carry the same
    figures, `--set`-able, and `memory.zero3_settings` turns them into this (they also size what a rank holds)."""

    persistence_threshold: int = 100_000
    max_reuse_distance: int = 1_000_000_000
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000


def ring(n):
    """(N-1)/N: the share of a buffer one rank moves in a ring reduce-scatter or all-gather over N ranks."""
    return (n - 1) / n


def _round_rows(x):
    return np.maximum(ALIGN_ROWS, ALIGN_ROWS * np.ceil(x / ALIGN_ROWS))


def autoep_rows(model, tokens, ep, imbalance: float = 1.0):
    """(rows the busiest rank receives, rows its grouped GEMMs run) per AutoEP layer and micro-batch (docstring)."""
    m = dims(model)
    group = ep * tokens
    hot = np.minimum(imbalance * group * m.k / m.E, group)
    rest = (group * m.k - hot) / max(m.E - 1, 1)
    others = m.E // ep - 1
    received = hot + others * rest
    computed = _round_rows(hot) + others * _round_rows(rest)
    if np.ndim(received) == 0:
        return float(received), float(computed)
    return received, computed


def expert_rows(model, tokens, tp, ep, imbalance: float, autoep):
    """(rows the rank's experts compute, rows its all-to-all sends and receives each way) per layer and micro-batch:
    the legacy layer's padded buffers (`shapes.routed_rows`, both the same) or AutoEP's routed rows."""
    if np.ndim(autoep) == 0:
        if autoep:
            received, computed = autoep_rows(model, tokens, ep, imbalance)
            return computed, received
        legacy = routed_rows(model, tokens, tp, ep, imbalance)
        return legacy, legacy
    legacy = routed_rows(model, tokens, tp, ep, imbalance)
    received, computed = autoep_rows(model, tokens, ep, imbalance)
    return np.where(autoep, computed, legacy), np.where(autoep, received, legacy)


def _persistent(numel, threshold):
    return np.where(numel <= threshold, numel, 0)


NO_LAYER = LayerShape(False, 0, 0, 0, 0, 0, 0, 0, 0)


def layer_rows(model) -> tuple[LayerShape, LayerShape]:
    """(an MoE layer's, a dense layer's `shapes.LayerShape`): the model's own where it carries them (`perf.Shape.rows`,
    from `shapes.layer_table`), else a Mixtral-shaped MoE layer's from the widths and no dense layer."""
    m = dims(model)
    rows = getattr(m, "rows", ())
    if rows:
        return rows
    return LayerShape(True, attention_params(m), 0, 2 * m.D, m.D * m.E, 0, 0, m.E, expert_params(m)), NO_LAYER


def stage_params(model, *, layers, first, last, tp, ep, dense_layers=0) -> RankParams:
    """Parameters one rank of a stage holds: `layers` decoder layers, `dense_layers` of them dense FFN layers, each
    kind its `layer_rows` row (numbers or arrays; `shapes.rank_params` of the stage's layer range, by counts)."""
    m = dims(model)
    moe_row, dense_row = layer_rows(m)
    moe = layers - dense_layers
    dense = moe * moe_row.dense_on_rank(tp) + dense_layers * dense_row.dense_on_rank(tp) + first * m.V * m.D
    dense = dense + last * (m.D + (0 if m.tied else m.V * m.D))
    return RankParams(dense=dense, expert=moe * (moe_row.experts // ep) * moe_row.per_expert)


class LayerParts(NamedTuple):
    """Parameters of one decoder layer on a rank in the order its forward uses them (numbers or arrays)."""

    attention: object  # input norm, q, k, v, o / tp, their biases and q/k norms (dense)
    moe_dense: object  # post-attention norm, router, shared experts; a dense layer's: norm and FFN (dense)
    experts: object  # the rank's E/e experts


def layer_parts(model, *, tp, ep, dense=False) -> LayerParts:
    """One decoder layer's parameters (an MoE layer's, or with `dense` a dense FFN layer's), split as ZeRO-3 meets
    them (they add up to its `layer_rows` row on the rank)."""
    m = dims(model)
    row = layer_rows(m)[1 if dense else 0]
    return LayerParts(attention=row.attention // tp + row.attention_whole + m.D,
                      moe_dense=m.D + row.router + row.shared + row.ffn,
                      experts=row.experts // ep * row.per_expert)


def persistent_parts(model, *, tp, ep, autoep, threshold, dense=False) -> tuple[LayerParts, object, object]:
    """(a decoder layer's `LayerParts`, the embedding, the final norm and LM head) that ZeRO-3 keeps whole: each
    tensor of at most `threshold` elements, tensor by tensor as the model holds them (q, k, v, o / tp, two norms, the
    router; the experts: the model's block gated [E, 2I, D] and [E, D, I] or two [E, I, D], AutoEP gate, up and down
    [E/e, I, D] each; the families' q/k/v biases / tp, o bias and q/k norms, the shared experts' g matrices [I_s, D]
    and gate [1, D]; with `dense`, a dense layer's: attention, norm and its FFN's g matrices [I, D])."""
    m = dims(model)
    p = lambda n: _persistent(n, threshold)  # noqa: E731
    split, whole = getattr(m, "attention_small", ((), ()))
    attention = (2 * p(m.Dq * m.D // tp) + 2 * p(m.Dkv * m.D // tp) + p(m.D) + sum(p(n // tp) for n in split)
                 + sum(p(n) for n in whole))
    ends = p(m.V * m.D), p(m.D) + (0 if m.tied else p(m.V * m.D))
    if dense:
        return LayerParts(attention=attention, moe_dense=p(m.D) + m.g * p(getattr(m, "I_dense", 0) * m.D),
                          experts=0), *ends
    n = (m.E // ep) * m.I * m.D
    experts = 2 * p(n) if m.g == 2 else np.where(autoep, 3 * p(n), p(2 * n) + p(n))
    shared = (m.g * p(m.I_shared * m.D) + (p(m.D) if m.shared_gate else 0)) if getattr(m, "I_shared", 0) else 0
    layer = LayerParts(attention=attention, moe_dense=p(m.D) + p(m.E * m.D) + shared, experts=experts)
    return layer, *ends


def persistent_params(model, *, tp, ep, autoep, threshold):
    """`persistent_parts` as (dense of a decoder layer, experts of a decoder layer, the embedding, the final norm and
    LM head): the parameters ZeRO-3 keeps whole."""
    layer, embed, head = persistent_parts(model, tp=tp, ep=ep, autoep=autoep, threshold=threshold)
    return layer.attention + layer.moe_dense, layer.experts, embed, head


@dataclass(frozen=True)
class DataParallelTraffic:
    """Link bytes per rank of a stage's data-parallel collectives (docstring table; numbers or arrays)."""

    gradient_per_step: object  # ZeRO-0/1 reduction, ZeRO-2's weight all-gather
    gradient_per_micro_batch: object  # ZeRO-2/3 reduce-scatter after each backward
    gather_per_micro_batch: object  # ZeRO-3 parameter all-gathers, forward + backward
    gather_per_step: object  # ZeRO-3 persistent parameters re-gathered after the step

    def per_step(self, m):
        """(gradient bytes, parameter-gather bytes) of a whole optimizer step of m micro-batches."""
        return (self.gradient_per_step + m * self.gradient_per_micro_batch,
                m * self.gather_per_micro_batch + self.gather_per_step)


@dataclass(frozen=True)
class Zero3Gathers:
    """Parameters (elements, not bytes) ZeRO-3 all-gathers on one rank per micro-batch, dense (over dp) and expert
    (over dp/e), and those it keeps whole (numbers or arrays)."""

    forward_dense: object
    forward_expert: object
    backward_dense: object  # re-gathered in the backward: released after the forward (reuse distance)
    backward_expert: object
    persistent_dense: object  # never gathered in forward or backward; all-gathered once after the step
    persistent_expert: object


def zero3_gathers(model, *, layers, first, last, tp, ep, ckpt=False, autoep=False,
                  zero3: Zero3Settings = Zero3Settings(), dense_layers=0) -> Zero3Gathers:
    """What ZeRO-3 gathers per micro-batch on one rank of a stage with `layers` decoder layers, `dense_layers` of them
    dense FFN layers leading the stage (docstring), a decoder layer taken as two parts, attention then MoE (or FFN)
    (`LayerParts`), each gathered again in the backward as a whole."""
    m = dims(model)
    whole = layer_parts(m, tp=tp, ep=ep)
    keep, keep_embed, keep_head = persistent_parts(m, tp=tp, ep=ep, autoep=autoep,
                                                   threshold=zero3.persistence_threshold)
    got = LayerParts(*(w - k for w, k in zip(whole, keep)))  # the gathered (partitioned) part of each
    keep_d = persistent_parts(m, tp=tp, ep=ep, autoep=autoep, threshold=zero3.persistence_threshold, dense=True)[0]
    got_d = LayerParts(*(w - k for w, k in zip(layer_parts(m, tp=tp, ep=ep, dense=True), keep_d)))  # a dense layer's
    embed, head = first * m.V * m.D, last * (m.D + (0 if m.tied else m.V * m.D))
    embed_got, head_got = embed - first * keep_embed, head - last * keep_head
    c = np.asarray(ckpt, dtype=float)
    n, n_got = sum(whole), sum(got)
    moe, moe_got = whole.moe_dense + whole.experts, got.moe_dense + got.experts
    reuse, live = zero3.max_reuse_distance, zero3.max_live_parameters if zero3.prefetch_bucket_size > 0 else 0

    def kept(extra_reuse, extra_live):
        """Layers from the stage's end (i = L-1-j = 0, 1, ...) whose part stays gathered to its next use."""
        by_reuse = np.ceil(np.maximum(reuse - 2.0 * head - extra_reuse, 0) / np.maximum((2.0 + c) * n, 1))
        by_lookahead = np.ceil(np.maximum(live - head_got - extra_live, 0) / np.maximum(n_got, 1))
        return np.maximum(by_reuse, by_lookahead)

    again_moe = layers - np.minimum(layers, kept(c * whole.attention, moe_got))
    again_attention = layers - np.minimum(layers, kept((2.0 - c) * moe, n_got))
    # of the layers gathered again (the stage's earliest), the leading dense layers
    dense_moe, dense_attention = np.minimum(again_moe, dense_layers), np.minimum(again_attention, dense_layers)
    embed_again = kept(0, embed_got) <= layers
    head_again = (reuse <= 0) & (live <= 0)  # its backward follows its forward at once
    moe_layers = layers - dense_layers
    return Zero3Gathers(
        forward_dense=(moe_layers * (got.attention + got.moe_dense) + dense_layers * (got_d.attention + got_d.moe_dense)
                       + embed_got + head_got),
        forward_expert=moe_layers * got.experts,
        backward_dense=((again_attention - dense_attention) * got.attention + (again_moe - dense_moe) * got.moe_dense
                        + embed_again * embed_got + head_again * head_got + dense_attention * got_d.attention
                        + dense_moe * got_d.moe_dense),
        backward_expert=(again_moe - dense_moe) * got.experts,
        persistent_dense=(moe_layers * (keep.attention + keep.moe_dense)
                          + dense_layers * (keep_d.attention + keep_d.moe_dense) + first * keep_embed
                          + last * keep_head),
        persistent_expert=moe_layers * keep.experts)


def data_parallel_traffic(model, b, *, layers, first, last, tp, ep, dp, zero, ckpt=False, autoep=False,
                          zero3: Zero3Settings = Zero3Settings(), dense_layers=0) -> DataParallelTraffic:
    """The data-parallel collectives of one rank of a stage with `layers` decoder layers, `dense_layers` of them dense
    FFN layers (docstring): the stage's own parameters (`stage_params`)."""
    m = dims(model)
    dense, expert = stage_params(m, layers=layers, first=first, last=last, tp=tp, ep=ep, dense_layers=dense_layers)
    once = b * (ring(dp) * dense + ring(dp / ep) * expert)  # one reduce-scatter (or all-gather) of every parameter
    zero = np.asarray(zero)
    gradient_per_step = np.where(zero <= 1, 2.0 * once, np.where(zero == 2, once, 0.0))
    gradient_per_micro_batch = np.where(zero >= 2, once, 0.0)
    if not np.any(zero == 3):
        return DataParallelTraffic(gradient_per_step, gradient_per_micro_batch, 0.0, 0.0)
    g = zero3_gathers(m, layers=layers, first=first, last=last, tp=tp, ep=ep, ckpt=ckpt, autoep=autoep, zero3=zero3,
                      dense_layers=dense_layers)
    rd, rx = ring(dp), ring(dp / ep)
    gathers = b * (rd * (g.forward_dense + g.backward_dense) + rx * (g.forward_expert + g.backward_expert))
    persistent = b * (rd * g.persistent_dense + rx * g.persistent_expert)
    z3 = zero == 3
    return DataParallelTraffic(gradient_per_step, gradient_per_micro_batch, np.where(z3, gathers, 0.0),
                               np.where(z3, persistent, 0.0))
