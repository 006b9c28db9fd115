"""Activation bytes: what autograd saves for backward in this model's real forward, per micro-batch.

Every term was read off the forward of `MoEForCausalLM` (and of DeepSpeed's legacy MoE layer and AutoEP layer for ep
> 1) by listing the tensors `torch.autograd.graph.saved_tensors_hooks` sees, each storage counted once.
`benchmarks/memory_accuracy.py` and the tests compare the totals with that measurement (fp32 and bf16, gelu and
silu, top-1/2/3, z-loss, checkpointing, skewed routing, the blocks converted by DeepSpeed's AutoEP in one process,
DeepSpeed's legacy and AutoEP layers on 2 ranks under ZeRO-1 and ZeRO-3, a pipeline stage's forward pass): they
agree to the byte; and what a real training step holds when its backward starts with the saved and held bytes
together, within 0.3% (the legacy layer keeps its last router logits on the module). AutoEP's CUDA-only Triton path
(`MicroBatch.triton`) is read from DeepSpeed's source, not measured: CPU ranks run its PyTorch fallbacks.
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") is the template; this
model differs from their GPT block (no dropout, RMSNorm computed in fp32, SDPA keeps no score matrix, an MoE block
instead of the MLP), so the coefficients are this model's own.

Symbols: B micro-batch, S sequence, T = B*S tokens, D hidden, Hq/Hkv query/key-value heads of width d, E experts,
K top-k, I expert FFN width, V vocabulary, b bytes of the compute dtype (2 bf16/fp16, 4 fp32), t tensor-parallel
size, R routed token copies (T*K without dropping). Index tensors are int64 (8 bytes); the router and the loss run
in fp32 (4 bytes) whatever the compute dtype.

Per decoder layer:
    RMSNorm (x2)      4*T*D (its input in fp32) + 4*T (rsqrt) + b*T*D (normalised, before the gain)
    attention         b*T*D (input of q/k/v) + b*T*(Hq + 2*Hkv)*d/t (q, k after RoPE, v) + b*T*Hq*d/t (SDPA out,
                      also o_proj's input) + 4*T*Hq/t (SDPA's row log-sum-exp). No S x S term: SDPA's fused kernels
                      keep only the output and the log-sum-exp.
    router            b*T*D (input) + 4*T*E (fp32 softmax) + 8*T*K (top-k ids) + 4*T*K (top-k probs) + 4*T
                      (their sum) + 4*E (f_e of the aux loss); with a z-loss 4*T*E + 4*T more
    experts, ep = 1   the model's own block: one sort groups the routed copies by expert, each expert runs once,
                      `index_add` combines. 8*T*K (sort order) + 8*R (token of each copy) + b*R*D (gathered input)
                      + b*R*I*m (the FFN's pre-activation, m = 1 gelu, 2 gated silu; `grouped_ffn`
                      recomputes the activation in backward) + b*R*D (expert outputs) + b*R (gate weights)
                      + b*R*D (weighted outputs). Every expert's rows are slices of one buffer of R rows, so the
                      bytes are the same for balanced and for skewed routing (measured): no imbalance term here.
    experts, legacy   DeepSpeed's `MOELayer` with sparse routes: every expert's buffer is C rows deep, C the busiest
                      expert's load over the expert-parallel group (dropless) or the capacity (capacity_factor set);
                      with tp > 1 each tp rank runs C/t of them. 8*(E*C + 1) (dispatch index) + b*E*C/t*(D + I*m)
                      (expert inputs and FFN: m = 2 gelu, its input and output; m = 4 gated silu, the [2I]
                      projection, the activation and the product) + 8*K*T (combine
                      index) + b*K*T*D (gathered outputs) + 4*K*T (fp32 gates). Balanced routing gives
                      C = ceil(T*K/E); an imbalance factor f (busiest over mean expert load) gives
                      C = min(ceil(f*T*K/E), T): the difference is the imbalance headroom.
    experts, autoep   DeepSpeed's AutoEP (`parallel.moe_backend` autoep; `deepspeed/module_inject/auto_ep_layer.py`
                      `_forward`): no capacity padding. N = the routed rows this rank's E/ep experts receive through
                      the variable-split all-to-all (`traffic.autoep_rows`: T*K balanced, the busiest rank's rows
                      under the imbalance assumption; or measured). `permute_by_local_expert` gathers them into one
                      expert-major buffer of P = 8*ceil(N/8) + 8*E/ep rows (`padded_max_len`: the per-expert
                      rounding of `generate_permute_indices` to multiples of 8, at least 8, fits inside it), which
                      the grouped GEMMs read whole. Saved: 8*T*K (sort order) + 8*T*K (token of each copy) + 4*P
                      (int32 permutation) + 4*E/ep (int32 group offsets) + b*P*D (the permuted input, saved by the
                      gate/up GEMMs) + b*P*I*m (m = 3 with DeepSpeed's Triton SwiGLU on CUDA: gate, up and the
                      product; 4 under PyTorch's fallback on CPU ranks, which also saves silu(gate)) + b*T*K*D (the
                      un-permuted expert outputs [T, K, D] of the weighted combine) + 4*T*K (their fp32 weights);
                      with Triton (CUDA) the gather-based permute and un-permute each save an int64 inverse
                      permutation of the N rows, 16*N. The all-to-all's send and receive buffers are not saved.
                      The router is DeepSpeed's (the terms above; its softmax and top-k weights, the same
                      tensors) and `parallel.autoep.AutoEPBlock` adds its own fp32 softmax for the aux loss, 4*T*E.

Once per micro-batch: 8*T (token ids, the embedding's index), 2*b*S*d (RoPE cos/sin, shared by the layers; each
pipeline layer computes its own), the final RMSNorm, b*T*D (LM-head input), 4*T*V (fp32 log-softmax over every
position: the labels are shifted and padded, the logits are not sliced), 8*T (those labels), 4 (the loss's total
weight). The training step also holds the logits b*T*V through backward (`train.engine`'s step keeps the forward's
output object until `engine.backward` returns; the pipeline engine's output buffer): not saved by autograd, reported
apart (`held_bytes`). It is a storage of its own: cross_entropy saves its log-softmax output, a new [T, V], never
the logits (in fp32 `logits.float()` is the logits themselves, in bf16 a copy nothing saves). So the saved tensors
alone miss one [T, V] of memory as spent: on the held-out fp32 config of issue 16 (2 layers, hidden 128, 4 gelu
experts, vocab 512, 2 x 256 tokens) they are 12,507,172 bytes by storage, the real step holds 13,555,828 in storages
its ops created when its backward starts (`benchmarks/memory_accuracy.py`; torch.profiler's allocation events:
13,555,860), the estimate's saved + held 13,555,748. The loss's backward briefly holds two fp32 [T, V] gradients
(`head_backward_transient`).

Activation checkpointing (transformers' non-reentrant checkpoint per decoder layer; DeepSpeed's per pipeline
layer): a layer keeps only its input, b*T*D; backward recomputes one layer at a time, which holds its full set
again, so the peak is the checkpoints plus one full layer.

Pipeline 1F1B (DeepSpeed's TrainSchedule): stage i holds min(m, pp - i) micro-batches in flight (m micro-batches per
step); each in-flight micro-batch also keeps the stage's received-input buffer (i > 0) and its output buffer
(i < pp - 1), b*T*D plus the fp32 aux/load carry each, and the logits on the last stage. What one forward pass of a
stage saves is measured; the in-flight count and these buffers are read from DeepSpeed 0.19's PipelineEngine
(`TrainSchedule.num_pipe_buffers`, `_exec_forward_pass`), not measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..configuration import MoEConfig
from ..strategy import Strategy
from ..units import FP32
from .shapes import expert_depth, routed_rows
from .traffic import ALIGN_ROWS, autoep_rows

INDEX_BYTES = 8  # int64 ids, sort orders, dispatch indices


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch on one rank: its shape, compute dtype and the split of the attention heads and experts."""

    micro_batch: int
    seq_len: int
    dtype_bytes: int  # 2 bf16/fp16, 4 fp32
    tp: int = 1
    ep: int = 1
    moe_backend: str = "auto"  # `Strategy.moe_backend`: auto resolves as the recipe does (`backend`)
    triton: bool = True  # AutoEP's kernels: DeepSpeed's Triton permute and SwiGLU (CUDA); False: PyTorch's (CPU)

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    def backend(self, cfg) -> str:
        """The MoE backend this micro-batch runs: `autoep`, or `legacy` (the model's own block at ep = 1,
        DeepSpeed's MoE layer at ep > 1); `auto` resolved by `Strategy.with_backend`, the recipe's own rule."""
        if self.moe_backend != "auto":
            return self.moe_backend
        return Strategy(tp=self.tp, ep=self.ep).with_backend(cfg).moe_backend


@dataclass
class Terms:
    """Named byte counts that add up; `total` is their sum."""

    items: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, value: int | float) -> Terms:
        self.items[name] = self.items.get(name, 0) + int(value)
        return self

    def merge(self, other: Terms, times: int = 1, prefix: str = "") -> Terms:
        for name, value in other.items.items():
            self.add(prefix + name, value * times)
        return self

    @property
    def total(self) -> int:
        return sum(self.items.values())


def rms_norm(T: int, D: int, b: int) -> Terms:
    return Terms().add("norm.input_fp32", FP32 * T * D).add("norm.rsqrt", FP32 * T).add("norm.normalised", b * T * D)


def attention(cfg: MoEConfig, mb: MicroBatch) -> Terms:
    T, b, t, d = mb.tokens, mb.dtype_bytes, mb.tp, cfg.head_dim
    hq, hkv = cfg.num_attention_heads // t, cfg.num_key_value_heads // t
    return (Terms().add("attn.input", b * T * cfg.hidden_size)
            .add("attn.q_k_v", b * T * (hq + 2 * hkv) * d)
            .add("attn.sdpa_out", b * T * hq * d)
            .add("attn.sdpa_logsumexp", FP32 * T * hq))


def router(cfg: MoEConfig, mb: MicroBatch, autoep: bool = False) -> Terms:
    """The router's saved tensors; `autoep`: DeepSpeed's router saves the same, and the adapter's softmax for the
    aux loss is one more fp32 [T, E]."""
    T, E, K = mb.tokens, cfg.num_local_experts, cfg.num_experts_per_tok
    terms = (Terms().add("router.input", mb.dtype_bytes * T * cfg.hidden_size)
             .add("router.probs_fp32", FP32 * T * E)
             .add("router.topk", INDEX_BYTES * T * K + FP32 * T * K + FP32 * T)
             .add("router.aux_f", FP32 * E))
    if autoep:
        terms.add("router.aux_probs_fp32", FP32 * T * E)
    if cfg.router_z_loss_coef > 0:
        terms.add("router.z_loss", FP32 * T * E + FP32 * T)
    return terms


def ffn_width_factor(cfg: MoEConfig, grouped: bool) -> int:
    """Saved [rows, I] tensors per routed row (see docstring). grouped (`grouped_ffn`, ep = 1): the pre-activation
    only, [2I] gated or [I] gelu. DeepSpeed's per-expert modules under plain autograd (ep > 1): gelu its input and
    output, gated silu four."""
    if grouped:
        return 2 if cfg.hidden_act == "silu" else 1
    return 4 if cfg.hidden_act == "silu" else 2


def experts_sorted(cfg: MoEConfig, mb: MicroBatch) -> Terms:
    """The model's own MoE block (ep = 1): sort, gather, per-expert FFN, weight, index_add."""
    T, b, D, K = mb.tokens, mb.dtype_bytes, cfg.hidden_size, cfg.num_experts_per_tok
    R = routed_rows(cfg, T)  # ep = 1: the routed copies the capacity (if any) keeps
    return (Terms().add("experts.sort_order", INDEX_BYTES * T * K)
            .add("experts.token_index", INDEX_BYTES * R)
            .add("experts.input", b * R * D)
            .add("experts.ffn", b * R * cfg.intermediate_size * ffn_width_factor(cfg, grouped=True))
            .add("experts.output", b * R * D)
            .add("experts.gate_weights", b * R)
            .add("experts.weighted_output", b * R * D))


def dispatch_depth(cfg: MoEConfig, mb: MicroBatch, imbalance: float = 1.0) -> int:
    """C, the rows of every expert's buffer in DeepSpeed's MoE layer (`ProjectGate`): `shapes.expert_depth` (the
    busiest expert's load over the ep group, dropless, with `imbalance` = max/mean expert load; else the capacity),
    rounded up to a multiple of tp."""
    depth, t = expert_depth(cfg, mb.tokens, imbalance), mb.tp
    return max(math.ceil(depth / t) * t, t)


def experts_dispatched(cfg: MoEConfig, mb: MicroBatch, imbalance: float = 1.0, depth: int | None = None) -> Terms:
    """DeepSpeed's MOELayer (ep > 1): [E, C, D] dispatch, all-to-all, experts on C/tp rows, all-to-all, combine.

    `depth` gives C directly (a measured busiest-expert load, already rounded to tp) instead of `imbalance`.
    """
    T, b, D, K, E = mb.tokens, mb.dtype_bytes, cfg.hidden_size, cfg.num_experts_per_tok, cfg.num_local_experts
    C = depth if depth is not None else dispatch_depth(cfg, mb, imbalance)
    rows = E * C // mb.tp
    return (Terms().add("experts.dispatch_index", INDEX_BYTES * (E * C + 1))
            .add("experts.input", b * rows * D)
            .add("experts.ffn", b * rows * cfg.intermediate_size * ffn_width_factor(cfg, grouped=False))
            .add("experts.combine_index", INDEX_BYTES * K * T)
            .add("experts.gathered_output", b * K * T * D)
            .add("experts.gates_fp32", FP32 * K * T))


def autoep_received_rows(cfg: MoEConfig, mb: MicroBatch, imbalance: float = 1.0) -> int:
    """N, the routed rows this rank's experts receive per AutoEP layer (`traffic.autoep_rows`, whole rows)."""
    return math.ceil(autoep_rows(cfg, mb.tokens, mb.ep, imbalance)[0])


def autoep_buffer_rows(cfg: MoEConfig, mb: MicroBatch, rows: int) -> int:
    """P, the rows of AutoEP's expert-major buffer for N = `rows` received rows: `permute_by_local_expert`'s
    `padded_max_len` = N + 8 per local expert, rounded up to a multiple of 8."""
    return ALIGN_ROWS * math.ceil((rows + ALIGN_ROWS * (cfg.num_local_experts // mb.ep)) / ALIGN_ROWS)


def experts_autoep(cfg: MoEConfig, mb: MicroBatch, imbalance: float = 1.0, rows: int | None = None) -> Terms:
    """DeepSpeed's AutoEP layer on this rank (module docstring): `rows` gives N directly (measured), else
    `autoep_received_rows` at `imbalance`."""
    T, b, D, K = mb.tokens, mb.dtype_bytes, cfg.hidden_size, cfg.num_experts_per_tok
    N = rows if rows is not None else autoep_received_rows(cfg, mb, imbalance)
    P = autoep_buffer_rows(cfg, mb, N)
    terms = (Terms().add("experts.sort_order", INDEX_BYTES * T * K)
             .add("experts.token_index", INDEX_BYTES * T * K)
             .add("experts.permutation", 4 * P + 4 * (cfg.num_local_experts // mb.ep))
             .add("experts.input", b * P * D)
             .add("experts.ffn", b * P * cfg.intermediate_size * (3 if mb.triton else 4))
             .add("experts.gathered_output", b * T * K * D)
             .add("experts.gates_fp32", FP32 * T * K))
    if mb.triton:
        terms.add("experts.inverse_permutation", 2 * INDEX_BYTES * N)
    return terms


def experts(cfg: MoEConfig, mb: MicroBatch, imbalance: float = 1.0, depth: int | None = None,
            rows: int | None = None) -> Terms:
    """The MoE block's experts on the backend `mb` runs: the model's own block (legacy, ep = 1), DeepSpeed's MoE
    layer (legacy, ep > 1; `depth` a measured C) or AutoEP (`rows` a measured N)."""
    if mb.backend(cfg) == "autoep":
        return experts_autoep(cfg, mb, imbalance, rows)
    return experts_dispatched(cfg, mb, imbalance, depth) if mb.ep > 1 else experts_sorted(cfg, mb)


def decoder_layer(cfg: MoEConfig, mb: MicroBatch, imbalance: float = 1.0, depth: int | None = None,
                  rows: int | None = None) -> Terms:
    """Everything one decoder layer saves for backward, without checkpointing (RoPE tables excluded)."""
    T, D, b = mb.tokens, cfg.hidden_size, mb.dtype_bytes
    return (Terms().merge(rms_norm(T, D, b), times=2).merge(attention(cfg, mb))
            .merge(router(cfg, mb, autoep=mb.backend(cfg) == "autoep")).merge(experts(cfg, mb, imbalance, depth, rows)))


def rope_tables(cfg: MoEConfig, mb: MicroBatch) -> Terms:
    return Terms().add("rope.cos_sin", 2 * mb.dtype_bytes * mb.seq_len * cfg.head_dim)


def embedding(mb: MicroBatch) -> Terms:
    return Terms().add("embedding.ids", INDEX_BYTES * mb.tokens)


def lm_head_and_loss(cfg: MoEConfig, mb: MicroBatch) -> Terms:
    T, D, b, V = mb.tokens, cfg.hidden_size, mb.dtype_bytes, cfg.vocab_size
    return (Terms().merge(rms_norm(T, D, b), prefix="final_")
            .add("head.input", b * T * D)
            .add("loss.log_softmax_fp32", FP32 * T * V)
            .add("loss.labels", INDEX_BYTES * T)  # the shifted labels, padded with -100 at the end of each row
            .add("loss.total_weight", FP32))


def logits_held(cfg: MoEConfig, mb: MicroBatch) -> int:
    """The logits the training step keeps alive through backward (not an autograd-saved tensor)."""
    return mb.dtype_bytes * mb.tokens * cfg.vocab_size


def head_backward_transient(cfg: MoEConfig, mb: MicroBatch) -> int:
    """Gradient buffers alive at once at the loss's backward: d(log-probs) and d(logits) in fp32, [T, V] each."""
    return 2 * FP32 * mb.tokens * cfg.vocab_size


def checkpointed_layer(cfg: MoEConfig, mb: MicroBatch) -> Terms:
    """A checkpointed decoder layer keeps its input only."""
    return Terms().add("checkpoint.layer_input", mb.dtype_bytes * mb.tokens * cfg.hidden_size)


def model_saved(cfg: MoEConfig, mb: MicroBatch, checkpointing: bool, depths: list[int] | None = None,
                rows: list[int] | None = None) -> Terms:
    """What the hooks see for one forward of the whole `MoEForCausalLM` (pp = 1), per micro-batch.

    DeepSpeed's MoE layer (legacy, ep > 1): `depths` gives each layer's measured C (busiest expert's load); AutoEP:
    `rows` each layer's measured N on this rank; without them routing is balanced.
    Under transformers' non-reentrant checkpointing the RoPE tables reach the layers inside a tuple, so they are
    kept by the checkpoint's closure rather than saved through the hooks: they are not counted here.
    """
    terms = Terms().merge(embedding(mb))
    if checkpointing:
        terms.merge(checkpointed_layer(cfg, mb), times=cfg.num_hidden_layers)
    else:
        terms.merge(rope_tables(cfg, mb))
        for layer in range(cfg.num_hidden_layers):
            terms.merge(decoder_layer(cfg, mb, depth=depths[layer] if depths else None,
                                      rows=rows[layer] if rows else None))
    return terms.merge(lm_head_and_loss(cfg, mb))


def recomputed_layer(cfg: MoEConfig, mb: MicroBatch, *, rope_inside: bool) -> int:
    """Extra bytes while one checkpointed layer is recomputed in backward: its full saved set (with its own RoPE
    tables where the layer computes them, as pipeline layers do), minus its input where that input is itself what
    the first RMSNorm saves (fp32, where `x.float()` is `x`)."""
    full = decoder_layer(cfg, mb).total + (rope_tables(cfg, mb).total if rope_inside else 0)
    return full - (mb.tokens * cfg.hidden_size * FP32 if mb.dtype_bytes == FP32 else 0)


@dataclass(frozen=True)
class StageActivations:
    """Activation memory of one pipeline stage at its peak (all in-flight micro-batches, one layer recomputed)."""

    saved_bytes: int  # saved for backward by every in-flight micro-batch, plus the recomputed layer
    held_bytes: int  # held otherwise through backward: logits, pipeline input/output buffers
    imbalance_headroom_bytes: int  # extra dispatch rows if routing reaches the stated imbalance factor
    head_transient_bytes: int  # gradient buffers at the loss's backward (last stage)
    in_flight: int
    per_micro_batch: dict[str, int]

    @property
    def activations_bytes(self) -> int:
        return self.saved_bytes + self.held_bytes

    @property
    def backward_peak_bytes(self) -> int:
        """What the stage's activations cost at the backward peak: activations, imbalance headroom, loss-head
        gradients (the estimate adds the gradient bucket)."""
        return self.activations_bytes + self.imbalance_headroom_bytes + self.head_transient_bytes


def stage_activations(cfg: MoEConfig, mb: MicroBatch, *, layers: int, first: bool, last: bool, pp: int,
                      in_flight: int, checkpointing: bool, imbalance: float) -> StageActivations:
    """One stage's activations: `layers` decoder layers, the embedding if `first`, the head and loss if `last`."""
    carry = FP32 * (2 + cfg.num_hidden_layers * cfg.num_local_experts)  # pipeline: aux losses and expert loads
    per_mb = Terms()
    if first:
        per_mb.merge(embedding(mb))
    if checkpointing:
        per_mb.merge(checkpointed_layer(cfg, mb), times=layers)
        if pp > 1:
            per_mb.add("checkpoint.carry", carry * layers)
    else:
        # the single-device model shares one RoPE table; each pipeline layer computes its own
        per_mb.merge(rope_tables(cfg, mb), times=layers if pp > 1 else 1)
        per_mb.merge(decoder_layer(cfg, mb), times=layers)
    if last:
        per_mb.merge(lm_head_and_loss(cfg, mb))
    held = Terms()
    if checkpointing and pp == 1:
        held.merge(rope_tables(cfg, mb), prefix="held.")  # kept by the checkpoint closures, not saved via hooks
    if last:
        held.add("held.logits", logits_held(cfg, mb))
    if pp > 1:
        hidden = mb.dtype_bytes * mb.tokens * cfg.hidden_size + carry
        if not first:
            held.add("held.pipe_input_buffer", hidden)
        if not last:
            held.add("held.pipe_output_buffer", hidden)
    saved = per_mb.total * in_flight
    headroom = 0
    if mb.ep > 1 and cfg.capacity_factor is None and imbalance > 1:  # dropless: the busiest rank's extra rows
        skew = experts(cfg, mb, imbalance).total - experts(cfg, mb).total
        headroom = skew * (1 if checkpointing else layers * in_flight)
    if checkpointing and layers:
        saved += recomputed_layer(cfg, mb, rope_inside=pp > 1)
    return StageActivations(
        saved_bytes=saved,
        held_bytes=held.total * in_flight,
        imbalance_headroom_bytes=headroom,
        head_transient_bytes=head_backward_transient(cfg, mb) if last else 0,
        in_flight=in_flight,
        per_micro_batch={**per_mb.items, **held.items},
    )
