"""Shape arithmetic of the model, the one home shared by the parameter counts, the memory estimate, the performance
model and the planner: parameters a rank holds, rows its experts run, the depth of DeepSpeed's expert buffers.

Every function takes the model's widths as a `Dims` (or anything with its attribute names, e.g. `perf.Shape`; a
`MoEConfig` is converted by `dims`) and works on plain numbers and on numpy arrays of strategies alike (the planner
evaluates whole grids at once). Symbols: D hidden, Dq = Hq*d, Dkv = Hkv*d, E experts, k top-k, I expert FFN width,
g = 2 (two-matrix gelu FFN) or 3 (gated silu), V vocabulary, L layers, T tokens of a micro-batch.

    parameters, one rank of a stage (tp tensor-parallel, ep expert-parallel ranks)
        dense   layers * ((2*D*Dq + 2*D*Dkv) / tp + 2*D + D*E), + V*D on the first stage, + D + V*D (none when tied)
                on the last
        expert  layers * (E / ep) * g*I*D
    expert buffer depth C (DeepSpeed's MoE layer, ep > 1)
        dropless    min(ceil(f*T*k/E), T), f = the busiest expert's load over the mean (1: balanced)
        capacity    max(ceil(k*cf*T/E), min_capacity): `routing.expert_capacity`, the rule the model itself drops by
    routed rows, per layer and micro-batch on one rank
        ep = 1      the model's sort-based block: the T*k routed copies, or what the capacity lets through,
                    min(T*k, E*min(C, T)), on every tp rank
        ep > 1      every expert's buffer at its full depth: E*C/tp
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..routing import expert_capacity


@dataclass(frozen=True)
class Dims:
    """The model's widths the shape arithmetic reads (hashable; attribute names as in `perf.Shape`)."""

    D: int
    Dq: int
    Dkv: int
    E: int
    k: int
    I: int  # noqa: E741
    g: int
    V: int
    L: int
    tied: bool
    capacity_factor: float | None = None  # None (or 0): dropless
    min_capacity: int = 4


def dims(model: Any) -> Any:
    """`Dims` of a `MoEConfig` (or any object with its attribute names); a `Dims` or `perf.Shape` passes through."""
    if hasattr(model, "D"):
        return model
    return Dims(D=model.hidden_size, Dq=model.num_attention_heads * model.head_dim,
                Dkv=model.num_key_value_heads * model.head_dim, E=model.num_local_experts, k=model.num_experts_per_tok,
                I=getattr(model, "expert_width", model.intermediate_size),  # a routed expert's width
                g=3 if model.hidden_act == "silu" else 2, V=model.vocab_size,
                L=model.num_hidden_layers, tied=model.tie_word_embeddings, capacity_factor=model.capacity_factor,
                min_capacity=model.min_capacity)


class RankParams(NamedTuple):
    """Parameters one rank of a stage holds, split by how ZeRO partitions them (numbers or numpy arrays)."""

    dense: Any
    expert: Any

    @property
    def total(self):
        return self.dense + self.expert


def expert_params(model: Any) -> int:
    """Parameters of one expert: g*I*D."""
    m = dims(model)
    return m.g * m.I * m.D


def attention_params(model: Any, tp=1):
    """The q, k, v and o projections' weights on one of tp ranks: (2*D*Dq + 2*D*Dkv) / tp."""
    m = dims(model)
    return (2 * m.D * m.Dq + 2 * m.D * m.Dkv) // tp


def layer_dense_params(model: Any, tp=1):
    """Dense parameters of one decoder layer on one of tp ranks: attention / tp, two norms, the router."""
    m = dims(model)
    return attention_params(m, tp) + 2 * m.D + m.D * m.E


class LayerShape(NamedTuple):
    """One decoder layer's parameters by part (`layer_table`): `dense` is everything but the routed experts."""

    moe: bool
    attention: int  # q, k, v, o and the q/k/v biases: what tensor parallelism splits by heads
    attention_whole: int  # the o bias and per-head q/k norms: whole on every tp rank (`parallel.tensor_parallel`)
    norms: int  # the two RMSNorms
    router: int  # the gate's weight (a score bias is a buffer, not a parameter)
    shared: int  # the shared experts' FFN and its gate
    ffn: int  # a dense layer's FFN
    experts: int  # E routed experts
    per_expert: int  # g * I_expert * D

    @property
    def dense(self) -> int:
        return self.attention + self.attention_whole + self.norms + self.router + self.shared + self.ffn

    def dense_on_rank(self, tp=1):
        """The dense parameters one of tp ranks holds: the split attention / tp, the rest whole (a dense layer's
        FFN and the shared experts are replicated over tp like the norms)."""
        return self.attention // tp + self.dense - self.attention

    @property
    def total(self) -> int:
        return self.dense + self.experts * self.per_expert


def mla_tensors(config, tp: int = 1) -> list[tuple[int, bool, bool]]:
    """Multi-head latent attention's parameters (`modeling.MoEMLAttention`) in registration order on one of tp ranks
    (`TensorParallelMLA`), each (numel, a matrix, split by heads): q [H*(n+r), D], or q_a [q_lora, D] (+ bias), its
    norm and q_b [H*(n+r), q_lora]; kv_a [kv_lora + r, D] (+ bias), its norm, kv_b [H*(n+v), kv_lora]; o [D, H*v]
    (+ bias, counted with the split part: tp with it is refused). n, r, v: qk_nope_head_dim, qk_rope_head_dim,
    v_head_dim; biases with `attention_bias`."""
    D, H, bias = config.hidden_size, config.num_attention_heads // tp, config.attention_bias
    n, r, v, q_rank, kv_rank = (config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim,
                                config.q_lora_rank, config.kv_lora_rank)
    if q_rank is None:
        out = [(H * (n + r) * D, True, True)]
    else:
        out = [(q_rank * D, True, False)] + [(q_rank, False, False)] * bias
        out += [(q_rank, False, False), (H * (n + r) * q_rank, True, True)]
    out += [((kv_rank + r) * D, True, False)] + [(kv_rank + r, False, False)] * bias
    out += [(kv_rank, False, False), (H * (n + v) * kv_rank, True, True), (D * H * v, True, True)]
    return out + [(D, False, True)] * bias


def mla_params(config) -> tuple[int, int]:
    """Multi-head latent attention's parameters (`mla_tensors`), (split by heads, whole on every rank)."""
    tensors = mla_tensors(config)
    return sum(n for n, _, split in tensors if split), sum(n for n, _, split in tensors if not split)


def layer_table(config) -> list[LayerShape]:
    """Every decoder layer of a `MoEConfig` by part, the one home of the per-layer parameter arithmetic of the
    families' blocks (`MoEConfig`'s settings after `initializer_range`), layer by layer:

        attention  `attention_params` + Dq + 2*Dkv (`attention_bias`), split over tp; whole on each tp rank:
                   D (`attention_out_bias`) + 2*d (`qk_norm` head) or Dq + Dkv (projection); MLA: `mla_params`
        MoE layer  router D*E, experts E*g*I_e*D (I_e = `expert_width`), shared g*D*I_s (+ D for its gate)
        dense layer  g*D*I (`intermediate_size`), no router
    A Mixtral-shaped config's rows are `layer_dense_params` and `expert_params` (`rank_params` reads those)."""
    m = dims(config)
    d = config.head_dim
    attention = attention_params(m) + (m.Dq + 2 * m.Dkv) * config.attention_bias
    whole = m.D * config.attention_out_bias + {None: 0, "head": 2 * d, "projection": m.Dq + m.Dkv}[config.qk_norm]
    if getattr(config, "mla", False):
        attention, whole = mla_params(config)
    per_expert = expert_params(m)
    shared = m.g * m.D * config.shared_width + m.D * bool(config.shared_width and config.shared_expert_gate)
    rows = []
    for layer in range(m.L):
        if config.is_moe_layer(layer):
            rows.append(LayerShape(True, attention, whole, 2 * m.D, m.D * m.E, shared, 0, m.E, per_expert))
        else:
            rows.append(LayerShape(False, attention, whole, 2 * m.D, 0, 0, m.g * m.D * config.intermediate_size, 0, 0))
    return rows


# Block settings the model computes that the activation and step-time models do not price (`unpriced_settings`).
# Every block setting is priced: the families' blocks per layer kind (`activations.decoder_layer` to the byte, the
# step time per stage's MoE and dense layers, `perf.stage_kinds`), multi-head latent attention too
# (`activations.mla_attention`, `perf.mla_widths`, `mla_params`). A setting the model gains before the estimate
# prices it is named here until then.
UNPRICED_SETTINGS: tuple[str, ...] = ()


def unpriced_settings(model: Any) -> list[str]:
    """`name value` for each `UNPRICED_SETTINGS` setting `model` turns on: `moe estimate` names them (text and JSON
    `unpriced_block_settings`) rather than hide an approximation."""
    return [f"{name} {getattr(model, name)!r}" for name in UNPRICED_SETTINGS if getattr(model, name, None)]


def rank_params(model: Any, *, layers, first, last, tp, ep) -> RankParams:
    """Parameters one rank of a stage holds (`first`/`last`: it holds the embedding / the final norm and LM head).
    `layers`: the stage's decoder layers, a `range` of their indices (a `MoEConfig`'s are then its `layer_table`
    rows: dense layers, shared experts, biases, q/k norms) or their count (every layer a Mixtral-shaped MoE layer,
    the widths of `dims`; numbers or numpy arrays)."""
    m = dims(model)
    if isinstance(layers, range) and hasattr(model, "is_moe_layer"):
        table = layer_table(model)
        rows = [table[i] for i in layers]
        dense = sum(row.dense_on_rank(tp) for row in rows) + first * m.V * m.D
        dense = dense + last * (m.D + (0 if m.tied else m.V * m.D))
        return RankParams(dense=dense, expert=sum(row.experts // ep * row.per_expert for row in rows))
    layers = len(layers) if isinstance(layers, range) else layers
    dense = layers * layer_dense_params(m, tp) + first * m.V * m.D
    dense = dense + last * (m.D + (0 if m.tied else m.V * m.D))
    expert = layers * (m.E // ep) * expert_params(m)
    return RankParams(dense=dense, expert=expert)


def expert_depth(model: Any, tokens, imbalance: float = 1.0):
    """C, the rows of every expert's buffer in DeepSpeed's MoE layer for `tokens` tokens (before any rounding):
    the busiest expert's load when dropless (an expert takes each token at most once), else the capacity."""
    m = dims(model)
    if m.capacity_factor:
        return expert_capacity(tokens, m.E, m.k, m.capacity_factor, m.min_capacity)
    return _minimum(_ceil(imbalance * tokens * m.k / m.E), tokens)


def routed_rows(model: Any, tokens, tp=1, ep=1, imbalance: float = 1.0):
    """Rows the experts of one rank compute per layer and micro-batch (see the module docstring)."""
    m = dims(model)
    if m.capacity_factor:
        kept = _minimum(tokens * m.k, m.E * _minimum(expert_depth(m, tokens), tokens))
    else:
        kept = tokens * m.k
    if np.ndim(ep) == 0 and ep <= 1:
        return kept
    dispatched = m.E * expert_depth(m, tokens, imbalance) / tp
    return dispatched if np.ndim(ep) == 0 else np.where(ep > 1, dispatched, kept)


# numpy's ufuncs where an argument is an array (the planner's grid), Python's exact integer ones on numbers (an
# order of magnitude faster on scalars, and ints stay ints for the byte counts)
def _ceil(x):
    return math.ceil(x) if np.ndim(x) == 0 else np.ceil(x)


def _minimum(a, b):
    return min(a, b) if np.ndim(a) == 0 and np.ndim(b) == 0 else np.minimum(a, b)
