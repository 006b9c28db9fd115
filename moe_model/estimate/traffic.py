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
            and the parameters all-gathered before use (`PartitionedParameterCoordinator.fetch_sub_module`):
            every partitioned parameter in each forward, and again in that micro-batch's backward where it was
            released after its forward; parameters of at most `persistence_threshold` elements stay whole
            (`ds_persist`: never gathered, re-gathered once after the step). A parameter is released after its
            forward unless it is used again within `max_reuse_distance` elements of parameters fetched in DeepSpeed's
            trace order (`__params_to_release`): for decoder layer j of L, the later layers' forward and backward,
            the LM head's both and (with recompute) the later layers' recomputed forward lie between its two uses,
            (2 + ckpt) (L-1-j) n_layer + 2 n_head elements (n: a module's whole parameters on the rank, ds_numel).
            The trace restarts every forward (`reset_step`), so every micro-batch gathers again.
            m (N-1)/N b (P_gathered + P_regathered) + (N-1)/N b P_persistent
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shapes import dims, rank_params, routed_rows

ALIGN_ROWS = 8  # deepspeed.moe.ep_kernels.TOKEN_GROUP_ALIGN_SIZE_M: rows per expert round up to a multiple, min 8


@dataclass(frozen=True)
class Zero3Settings:
    """DeepSpeed's stage-3 settings the gathers depend on, at DeepSpeed 0.19's defaults (train/ds_config.py sets
    none): `stage3_param_persistence_threshold`, `stage3_max_reuse_distance` (runtime/zero/config.py).
    Local to the time model until the memory estimator's `Assumptions` carry the same settings (they also size the
    gathered parameters a rank holds)."""

    persistence_threshold: int = 100_000
    max_reuse_distance: int = 1_000_000_000


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


def persistent_params(model, *, layers, first, last, tp, ep, autoep, threshold):
    """(dense, expert) parameters of a rank's stage that ZeRO-3 keeps whole (each tensor of at most `threshold`
    elements), tensor by tensor as the model holds them: q, k, v, o / tp, two norms, the router, the experts (the
    model's block: gated [E, 2I, D] and [E, D, I], or two [E, I, D]; AutoEP: gate, up and down [E/e, I, D] each),
    the embedding, the final norm and the LM head."""
    m = dims(model)
    p = lambda n: _persistent(n, threshold)  # noqa: E731
    dense_layer = 2 * p(m.Dq * m.D // tp) + 2 * p(m.Dkv * m.D // tp) + 2 * p(m.D) + p(m.E * m.D)
    n = (m.E // ep) * m.I * m.D
    if m.g == 2:
        expert_layer = 2 * p(n)
    else:
        expert_layer = np.where(autoep, 3 * p(n), p(2 * n) + p(n))
    dense = layers * dense_layer + first * p(m.V * m.D) + last * (p(m.D) + (0 if m.tied else p(m.V * m.D)))
    return dense, layers * expert_layer


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


def data_parallel_traffic(model, b, *, layers, first, last, tp, ep, dp, zero, ckpt=False, autoep=False,
                          zero3: Zero3Settings = Zero3Settings()) -> DataParallelTraffic:
    """The data-parallel collectives of one rank of a stage with `layers` decoder layers (docstring)."""
    m = dims(model)
    dense, expert = rank_params(m, layers=layers, first=first, last=last, tp=tp, ep=ep)
    rd, rx = ring(dp), ring(dp / ep)
    once = b * (rd * dense + rx * expert)  # one reduce-scatter (or all-gather) of every parameter
    zero = np.asarray(zero)
    gradient_per_step = np.where(zero <= 1, 2.0 * once, np.where(zero == 2, once, 0.0))
    gradient_per_micro_batch = np.where(zero >= 2, once, 0.0)
    keep_dense, keep_expert = persistent_params(m, layers=layers, first=first, last=last, tp=tp, ep=ep,
                                                autoep=autoep, threshold=zero3.persistence_threshold)
    # ZeRO-3's parameter gathers: per decoder layer (whole numel for the reuse distance, the gathered part to move)
    one = rank_params(m, layers=1, first=0, last=0, tp=tp, ep=ep)
    per_layer_keep = persistent_params(m, layers=1, first=0, last=0, tp=tp, ep=ep, autoep=autoep,
                                       threshold=zero3.persistence_threshold)
    layer_numel = one.dense + one.expert
    head_numel = last * (m.D + (0 if m.tied else m.V * m.D))
    embed_numel = first * m.V * m.D
    ends = rank_params(m, layers=0, first=first, last=last, tp=tp, ep=ep).dense
    ends_keep = persistent_params(m, layers=0, first=first, last=last, tp=tp, ep=ep, autoep=autoep,
                                  threshold=zero3.persistence_threshold)[0]
    ends_gathered = ends - ends_keep
    embed_gathered = embed_numel - _persistent(embed_numel, zero3.persistence_threshold)
    # decoder layers whose next use is at least max_reuse_distance elements away: i = L-1-j >= need
    span = (2.0 + np.asarray(ckpt, dtype=float)) * layer_numel
    need = np.ceil(np.maximum(zero3.max_reuse_distance - 2.0 * head_numel, 0) / np.maximum(span, 1))
    regathered_layers = layers - np.minimum(layers, need)
    embed_again = np.where(layers * span + 2.0 * head_numel >= zero3.max_reuse_distance, embed_gathered, 0)
    gathered_dense = layers * (one.dense - per_layer_keep[0]) + ends_gathered
    gathered_expert = layers * (one.expert - per_layer_keep[1])
    again_dense = regathered_layers * (one.dense - per_layer_keep[0]) + embed_again
    again_expert = regathered_layers * (one.expert - per_layer_keep[1])
    gathers = b * (rd * (gathered_dense + again_dense) + rx * (gathered_expert + again_expert))
    persistent = b * (rd * keep_dense + rx * keep_expert)
    z3 = zero == 3
    return DataParallelTraffic(gradient_per_step=gradient_per_step, gradient_per_micro_batch=gradient_per_micro_batch,
                               gather_per_micro_batch=np.where(z3, gathers, 0.0),
                               gather_per_step=np.where(z3, persistent, 0.0))
