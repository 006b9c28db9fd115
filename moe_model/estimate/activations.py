"""Activation bytes: what autograd saves for backward in this model's real forward, per micro-batch.

Every term was read off the forward of `MoEForCausalLM` (and of DeepSpeed's legacy MoE layer and AutoEP layer for ep
> 1) by listing the tensors `torch.autograd.graph.saved_tensors_hooks` sees, each storage counted once.
`benchmarks/memory_accuracy.py` and the tests compare the totals with that measurement (fp32 and bf16, gelu and
silu, top-1/2/3, z-loss, checkpointing, skewed routing, the blocks converted by DeepSpeed's AutoEP in one process,
DeepSpeed's legacy and AutoEP layers on 2 ranks under ZeRO-1 and ZeRO-3, a pipeline stage's forward pass, and the
families' blocks: Qwen2-MoE-, GLM-, Qwen3- and OLMoE-shaped configs): they agree to the byte; and what a real
training step holds when its backward starts with the saved and held bytes together, within 0.3% (the legacy layer
keeps its last router logits on the module). AutoEP's CUDA-only Triton path (`MicroBatch.triton`) is read from
DeepSpeed's source, not measured: CPU ranks run its PyTorch fallbacks.
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") is the template; this
model differs from their GPT block (no dropout, RMSNorm computed in fp32, SDPA keeps no score matrix, an MoE block
instead of the MLP), so the coefficients are this model's own.

Symbols: B micro-batch, S sequence, T = B*S tokens, D hidden, Hq/Hkv query/key-value heads of width d (Dq = Hq*d,
Dkv = Hkv*d), r the rotating width of a head (d, or its `partial_rotary_factor` share), E experts, K top-k, I_e a
routed expert's FFN width (`expert_width`), I a dense layer's (`intermediate_size`), I_s the shared experts' one FFN
(`shared_width`), V vocabulary, b bytes of the compute dtype (2 bf16/fp16, 4 fp32), t tensor-parallel size, R routed
token copies (T*K without dropping), G = `n_group` and G_k = `topk_group`. Index tensors are int64 (8 bytes); the
router and the loss run in fp32 (4 bytes) whatever the compute dtype. Each layer prices its own kind
(`MoEConfig.is_moe_layer`): an MoE layer is attention + router + routed experts (+ shared experts), a dense layer
(`dense_layers`) attention + one FFN.

Per decoder layer:
    RMSNorm (x2)      `rms_norm` over N rows of width W: 4*N*W (its input in fp32) + 4*N (rsqrt) + b*N*W
                      (normalised, before the gain); the layer's two norms are N = T, W = D
    attention         b*T*D (input of q/k/v) + b*T*(Hq + 2*Hkv)*d/t (q, k after RoPE, v) + b*T*Hq*d/t (SDPA out,
                      also o_proj's input) + 4*T*Hq/t (SDPA's row log-sum-exp). No S x S term: SDPA's fused kernels
                      keep only the output and the log-sum-exp. Biases (`attention_bias`, `attention_out_bias`)
                      save nothing. Per family:
                      q/k norm "head": `rms_norm` of N = T*Hq/t rows of width d (q) and N = T*Hkv/t (k);
                      q/k norm "projection": `rms_norm` of N = T rows of width Dq (q) and of width Dkv (k);
                      `clip_qkv`: each clamp saves its input, b*T*(Dq + 2*Dkv)/t;
                      partial rotary (r < d): RoPE ends in a cat, so q reaches SDPA laid out [B, H, S, d], SDPA's
                      output follows it and o_proj's input is a contiguous copy, b*T*Hq*d/t more (the flash kernels,
                      CPU's measured; with r = d q keeps the projection's [B, S, H, d] layout and nothing is copied).
    router            b*T*D (input) + 8*T*K (top-k ids) + 4*E (f_e of the aux loss); then by scoring:
                      softmax     4*T*E (fp32 probabilities)
                      sigmoid     4*T*E (fp32 scores) + 4*T (their per-token sum, the aux loss's probabilities).
                                  A score bias, groups and `routed_scaling_factor` add nothing held: the bias is an
                                  add, the scaling a product by a number, and the choice (scores + bias, each
                                  group's two best, the kept groups, the mask of the others, the top-k) is a branch
                                  of the graph only its indices leave: what it saves (16*T*G + 8*T*G_k + T*E with
                                  G > 1 groups) is freed before the forward returns (measured), and the weights are
                                  gathered from the unbiased scores, which the sigmoid saved already.
                      `norm_topk_prob`: 4*T*K (the k weights) + 4*T (their sum) more;
                      `router_aux_loss_per_sequence` (B > 1): 4*T (the token mask) + 4*B (tokens per sequence) +
                      4*B*E (f per sequence) instead of 4*E; with a z-loss 4*T*E + 4*T more
    shared experts    one FFN of width I_s every token goes through (`MoEMLP`, plain autograd, on every tp rank),
                      its input the router's: b*T*I_s*m (m = 2 gelu: its pre-activation and activation; m = 4 gated
                      silu: gate, up, silu(gate) and the product); `shared_expert_gate`: b*T (the sigmoid) + b*T*D
                      (the FFN's output it scales)
    dense FFN layer   b*T*D (input) + b*T*I*m (the shared experts' m) instead of router, routed and shared experts
    experts, ep = 1   the model's own block: one sort groups the routed copies by expert, each expert runs once,
                      `index_add` combines. 8*T*K (sort order) + 8*R (token of each copy) + b*R*D (gathered input)
                      + b*R*I_e*m (the FFN's pre-activation, m = 1 gelu, 2 gated silu; `grouped_ffn`
                      recomputes the activation in backward) + b*R*D (expert outputs) + b*R (gate weights)
                      + b*R*D (weighted outputs). Every expert's rows are slices of one buffer of R rows, so the
                      bytes are the same for balanced and for skewed routing (measured): no imbalance term here.
    experts, legacy   DeepSpeed's `MOELayer` with sparse routes: every expert's buffer is C rows deep, C the busiest
                      expert's load over the expert-parallel group (dropless) or the capacity (capacity_factor set);
                      with tp > 1 each tp rank runs C/t of them. 8*(E*C + 1) (dispatch index) + b*E*C/t*(D + I_e*m)
                      (expert inputs and FFN: m = 2 gelu, its input and output; m = 4 gated silu, the [2I_e]
                      projection, the activation and the product) + 8*K*T (combine
                      index) + b*K*T*D (gathered outputs) + 4*K*T (fp32 gates). Balanced routing gives
                      C = ceil(T*K/E); an imbalance factor f (busiest over mean expert load) gives
                      C = min(ceil(f*T*K/E), T): the difference is the imbalance headroom. The router (the project's
                      `ProjectGate`, the same `routing.route`), the shared experts and dense layers
                      (`parallel.moe_layer.DeepSpeedMoEBlock` keeps them beside DeepSpeed's layer, replicated) are
                      the terms above.
    experts, autoep   DeepSpeed's AutoEP (`parallel.moe_backend` autoep; `deepspeed/module_inject/auto_ep_layer.py`
                      `_forward`): no capacity padding. N = the routed rows this rank's E/ep experts receive through
                      the variable-split all-to-all (`traffic.autoep_rows`: T*K balanced, the busiest rank's rows
                      under the imbalance assumption; or measured). `permute_by_local_expert` gathers them into one
                      expert-major buffer of P = 8*ceil(N/8) + 8*E/ep rows (`padded_max_len`: the per-expert
                      rounding of `generate_permute_indices` to multiples of 8, at least 8, fits inside it), which
                      the grouped GEMMs read whole. Saved: 8*T*K (sort order) + 8*T*K (token of each copy) + 4*P
                      (int32 permutation) + 4*E/ep (int32 group offsets) + b*P*D (the permuted input, saved by the
                      gate/up GEMMs) + b*P*I_e*m (m = 3 with DeepSpeed's Triton SwiGLU on CUDA: gate, up and the
                      product; 4 under PyTorch's fallback on CPU ranks, which also saves silu(gate)) + b*T*K*D (the
                      un-permuted expert outputs [T, K, D] of the weighted combine) + 4*T*K (their fp32 weights);
                      with Triton (CUDA) the gather-based permute and un-permute each save an int64 inverse
                      permutation of the N rows, 16*N. The all-to-all's send and receive buffers are not saved.
                      The router is DeepSpeed's `TokenChoiceTopKRouter` (softmax only on this backend: the terms
                      above, `route_norm` = `norm_topk_prob` the same tensors) and `parallel.autoep.AutoEPBlock` adds
                      its own fp32 softmax for the aux loss, 4*T*E. Dense layers stay the model's.

Once per micro-batch: 8*T (token ids, the embedding's index), 2*b*S*r (RoPE cos/sin, shared by the layers; each
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
layer): a layer keeps only its input, b*T*D, whatever its kind; backward recomputes one layer at a time, which holds
its full set again, so the peak is the checkpoints plus the largest of the stage's layers.

Pipeline 1F1B (DeepSpeed's TrainSchedule): stage i holds min(m, pp - i) micro-batches in flight (m micro-batches per
step); each in-flight micro-batch also keeps the stage's received-input buffer (i > 0) and its output buffer
(i < pp - 1), b*T*D plus the fp32 aux/load carry each (2 + E per MoE layer of the model,
`parallel.pipeline.carry_size`), and the logits on the last stage. What one forward pass of a stage saves is
measured; the in-flight count and these buffers are read from DeepSpeed 0.19's PipelineEngine
(`TrainSchedule.num_pipe_buffers`, `_exec_forward_pass`), not measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    """`MoERMSNorm` over T rows of width D (the module docstring's `rms_norm`)."""
    return Terms().add("norm.input_fp32", FP32 * T * D).add("norm.rsqrt", FP32 * T).add("norm.normalised", b * T * D)


def rope_width(cfg: MoEConfig) -> int:
    """r, the rotating width of a head: the RoPE tables' last dimension (`MoERotaryEmbedding.frequencies`: one
    frequency per pair of the `partial_rotary_factor` share of d, each used twice)."""
    factor = (cfg.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    return 2 * math.ceil(int(cfg.head_dim * factor) / 2)


def attention(cfg: MoEConfig, mb: MicroBatch) -> Terms:
    """`MoEAttention` on this rank's heads, the family settings included (module docstring)."""
    T, b, t, d = mb.tokens, mb.dtype_bytes, mb.tp, cfg.head_dim
    hq, hkv = cfg.num_attention_heads // t, cfg.num_key_value_heads // t
    terms = Terms().add("attn.input", b * T * cfg.hidden_size)
    if cfg.qk_norm == "projection":  # over each token's whole q and k, before clip and RoPE
        terms.merge(rms_norm(T, hq * d, b), prefix="attn.q_").merge(rms_norm(T, hkv * d, b), prefix="attn.k_")
    if cfg.clip_qkv is not None:  # clamp saves its input
        terms.add("attn.clip_input", b * T * (hq + 2 * hkv) * d)
    if cfg.qk_norm == "head":  # over each head's d, after clip
        terms.merge(rms_norm(T * hq, d, b), prefix="attn.q_").merge(rms_norm(T * hkv, d, b), prefix="attn.k_")
    terms.add("attn.q_k_v", b * T * (hq + 2 * hkv) * d)
    terms.add("attn.sdpa_out", b * T * hq * d)
    terms.add("attn.sdpa_logsumexp", FP32 * T * hq)
    if rope_width(cfg) < d:  # q laid out [B, H, S, d] by RoPE's cat: o_proj's input is a contiguous copy
        terms.add("attn.o_proj_input", b * T * hq * d)
    return terms


def mla_attention(cfg: MoEConfig, mb: MicroBatch) -> Terms:
    """`MoEMLAttention` (module docstring; n, r, v its head widths, q = n + r, c the kv rank, q_r the q rank, H
    heads), as measured through the hooks: the layer's input b*T*D (q_a or q, and kv_a read it); with a q rank the
    RMSNorm over q_r and q_b's input b*T*q_r; the kv RMSNorm, whose fp32 input is kv_a's whole output b*T*(c + r)
    in fp32 (`x.float()` is x, and c of it a view) and a copy 4*T*c otherwise, and kv_b's input b*T*c; SDPA's q,
    k (new cats, b*T*H*q each), v and output: v zero-padded to q's width for the fused kernels where v < q (new,
    b*T*H*q each), else v a view of kv_b's output b*T*H*(n + v) and the output b*T*H*v; its log-sum-exp 4*T*H; and
    o_proj's input, a copy of the output b*T*H*v (laid [B, H, S, v], as the cat laid q). RoPE's products save only
    its tables (the shared `rope_tables`); the projections' outputs are not saved."""
    T, b, H = mb.tokens, mb.dtype_bytes, cfg.num_attention_heads // mb.tp
    n, r, v, c, q_rank = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank,
                          cfg.q_lora_rank)
    q = n + r
    terms = Terms().add("attn.input", b * T * cfg.hidden_size)
    if q_rank:
        terms.merge(rms_norm(T, q_rank, b), prefix="attn.q_a_").add("attn.q_b_input", b * T * q_rank)
    kv_norm = rms_norm(T, c, b)
    if b == FP32:  # the norm's fp32 input is kv_a's output itself, all of it
        kv_norm.items["norm.input_fp32"] = b * T * (c + r)
    terms.merge(kv_norm, prefix="attn.kv_a_").add("attn.kv_b_input", b * T * c)
    terms.add("attn.q_k", 2 * b * T * H * q)
    if v < q:
        terms.add("attn.v_padded", b * T * H * q).add("attn.sdpa_out", b * T * H * q)
    else:
        terms.add("attn.kv_b_output", b * T * H * (n + v)).add("attn.sdpa_out", b * T * H * v)
    return terms.add("attn.sdpa_logsumexp", FP32 * T * H).add("attn.o_proj_input", b * T * H * v)


def router(cfg: MoEConfig, mb: MicroBatch, autoep: bool = False) -> Terms:
    """The router's saved tensors as `routing.route` scores (module docstring); `autoep`: DeepSpeed's router saves
    the same (softmax only), and the adapter's softmax for the aux loss is one more fp32 [T, E]."""
    T, E, K, B = mb.tokens, cfg.num_local_experts, cfg.num_experts_per_tok, mb.micro_batch
    terms = (Terms().add("router.input", mb.dtype_bytes * T * cfg.hidden_size)
             .add("router.probs_fp32", FP32 * T * E)  # softmax's output, or sigmoid's
             .add("router.topk", INDEX_BYTES * T * K))
    if cfg.router_scoring == "sigmoid":  # (what choosing by groups saves is freed within the forward: docstring)
        terms.add("router.probs_sum", FP32 * T)  # the scores over their per-token sum: the aux loss's probabilities
    if cfg.norm_topk_prob:
        terms.add("router.topk", FP32 * T * K + FP32 * T)  # the k weights and their sum, saved by the division
    if cfg.router_aux_loss_per_sequence and B > 1:
        terms.add("router.aux_f", FP32 * T + FP32 * B + FP32 * B * E)
    else:
        terms.add("router.aux_f", FP32 * E)
    if autoep:
        terms.add("router.aux_probs_fp32", FP32 * T * E)
    if cfg.router_z_loss_coef > 0:
        terms.add("router.z_loss", FP32 * T * E + FP32 * T)
    return terms


def ffn_width_factor(cfg: MoEConfig, grouped: bool) -> int:
    """Saved [rows, I] tensors per row of an FFN of width I (see docstring). grouped (`grouped_ffn`, the routed
    experts at ep = 1): the pre-activation only, [2I] gated or [I] gelu. Under plain autograd (DeepSpeed's per-expert
    modules at ep > 1, the shared experts, a dense layer's FFN): gelu its pre-activation and activation, gated silu
    four (gate, up, silu(gate), the product)."""
    if grouped:
        return 2 if cfg.hidden_act == "silu" else 1
    return 4 if cfg.hidden_act == "silu" else 2


def shared_experts(cfg: MoEConfig, mb: MicroBatch) -> Terms:
    """The MoE block's shared FFN (`MoEMLP` of width `shared_width`, input the router's) and its sigmoid gate, on
    every token of every tp rank; nothing where the config has none."""
    T, b = mb.tokens, mb.dtype_bytes
    terms = Terms()
    if cfg.shared_width:
        terms.add("shared.ffn", b * T * cfg.shared_width * ffn_width_factor(cfg, grouped=False))
        if cfg.shared_expert_gate:
            terms.add("shared.gate", b * T).add("shared.output", b * T * cfg.hidden_size)
    return terms


def dense_ffn(cfg: MoEConfig, mb: MicroBatch) -> Terms:
    """A dense layer's FFN (`MoEConfig.dense_layers`: `MoEMLP` of width `intermediate_size`), replicated over tp."""
    T, b = mb.tokens, mb.dtype_bytes
    return (Terms().add("ffn.input", b * T * cfg.hidden_size)
            .add("ffn.hidden", b * T * cfg.intermediate_size * ffn_width_factor(cfg, grouped=False)))


def experts_sorted(cfg: MoEConfig, mb: MicroBatch) -> Terms:
    """The model's own MoE block (ep = 1): sort, gather, per-expert FFN, weight, index_add."""
    T, b, D, K = mb.tokens, mb.dtype_bytes, cfg.hidden_size, cfg.num_experts_per_tok
    R = routed_rows(cfg, T)  # ep = 1: the routed copies the capacity (if any) keeps
    return (Terms().add("experts.sort_order", INDEX_BYTES * T * K)
            .add("experts.token_index", INDEX_BYTES * R)
            .add("experts.input", b * R * D)
            .add("experts.ffn", b * R * cfg.expert_width * ffn_width_factor(cfg, grouped=True))
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
            .add("experts.ffn", b * rows * cfg.expert_width * ffn_width_factor(cfg, grouped=False))
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
             .add("experts.ffn", b * P * cfg.expert_width * (3 if mb.triton else 4))
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
                  rows: int | None = None, layer: int | None = None) -> Terms:
    """Everything one decoder layer saves for backward, without checkpointing (RoPE tables excluded): layer `layer`
    of the model by its kind (`MoEConfig.is_moe_layer`), or an MoE layer where `layer` is None. An MoE layer: its
    router, routed experts (`experts`: `depth`, `rows` as there) and shared experts; a dense layer: its FFN."""
    T, D, b = mb.tokens, cfg.hidden_size, mb.dtype_bytes
    terms = Terms().merge(rms_norm(T, D, b), times=2).merge(mla_attention(cfg, mb) if cfg.mla else attention(cfg, mb))
    if layer is not None and not cfg.is_moe_layer(layer):
        return terms.merge(dense_ffn(cfg, mb))
    return (terms.merge(router(cfg, mb, autoep=mb.backend(cfg) == "autoep"))
            .merge(experts(cfg, mb, imbalance, depth, rows)).merge(shared_experts(cfg, mb)))


def layer_kinds(cfg: MoEConfig, layers: int | Sequence[int]) -> dict[int | None, int]:
    """{a representative layer index: how many of `layers` are of its kind}: `layers` are layer indices (each by
    its kind, `MoEConfig.is_moe_layer`) or a count of MoE layers (key None: `decoder_layer`'s MoE layer)."""
    if not isinstance(layers, Sequence):  # a count (a Python or numpy integer)
        return {None: int(layers)} if layers else {}
    dense = [i for i in layers if not cfg.is_moe_layer(i)]
    kinds: dict[int | None, int] = {}
    if len(layers) > len(dense):
        kinds[None] = len(layers) - len(dense)
    if dense:  # every dense layer is the same: counted under the first
        kinds[dense[0]] = len(dense)
    return kinds


def rope_tables(cfg: MoEConfig, mb: MicroBatch) -> Terms:
    return Terms().add("rope.cos_sin", 2 * mb.dtype_bytes * mb.seq_len * rope_width(cfg))


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
    """What the hooks see for one forward of the whole `MoEForCausalLM` (pp = 1), per micro-batch, each layer by
    its kind.

    DeepSpeed's MoE layer (legacy, ep > 1): `depths` gives each MoE layer's measured C (busiest expert's load), in
    order (`expert_counts_LE`'s rows: dense layers have none); AutoEP: `rows` each MoE layer's measured N on this
    rank; without them routing is balanced.
    Under transformers' non-reentrant checkpointing the RoPE tables reach the layers inside a tuple, so they are
    kept by the checkpoint's closure rather than saved through the hooks: they are not counted here.
    """
    terms = Terms().merge(embedding(mb))
    if checkpointing:
        terms.merge(checkpointed_layer(cfg, mb), times=cfg.num_hidden_layers)
    else:
        terms.merge(rope_tables(cfg, mb))
        for slot, layer in enumerate(cfg.moe_layers):
            terms.merge(decoder_layer(cfg, mb, depth=depths[slot] if depths else None,
                                      rows=rows[slot] if rows else None, layer=layer))
        dense = len(cfg.dense_layers)
        if dense:
            terms.merge(decoder_layer(cfg, mb, layer=cfg.dense_layers[0]), times=dense)
    return terms.merge(lm_head_and_loss(cfg, mb))


def recomputed_layer(cfg: MoEConfig, mb: MicroBatch, *, rope_inside: bool,
                     layers: int | Sequence[int] | None = None) -> int:
    """Extra bytes while one checkpointed layer is recomputed in backward: the largest full saved set of `layers`
    (indices, or a count of MoE layers as in `layer_kinds`; default every layer of the model), with its own RoPE
    tables where the layer computes them (as pipeline layers do), minus its input where that input is itself what
    the first RMSNorm saves (fp32, where `x.float()` is `x`)."""
    kinds = layer_kinds(cfg, range(cfg.num_hidden_layers) if layers is None else layers)
    if not kinds:
        return 0
    full = max(decoder_layer(cfg, mb, layer=layer).total for layer in kinds)
    full += rope_tables(cfg, mb).total if rope_inside else 0
    return full - (mb.tokens * cfg.hidden_size * FP32 if mb.dtype_bytes == FP32 else 0)


def pipeline_carry(cfg: MoEConfig) -> int:
    """Bytes of the fp32 vector stages pass beside the hidden states: the aux and z losses and each MoE layer's
    expert loads (`parallel.pipeline.carry_size`, not imported: estimate/ needs no parallel/)."""
    return FP32 * (2 + len(cfg.moe_layers) * cfg.num_local_experts)


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


def stage_activations(cfg: MoEConfig, mb: MicroBatch, *, layers: int | Sequence[int], first: bool, last: bool,
                      pp: int, in_flight: int, checkpointing: bool, imbalance: float) -> StageActivations:
    """One stage's activations: its decoder layers, the embedding if `first`, the head and loss if `last`.
    `layers`: the stage's layer indices (`memory.stage_ranges`), each priced by its kind, or a count of MoE layers
    (`layer_kinds`; a Mixtral-shaped model's layers are all MoE layers, so there the two agree)."""
    kinds = layer_kinds(cfg, layers)
    count = sum(kinds.values())
    moe_count = kinds.get(None, 0)
    carry = pipeline_carry(cfg)  # pipeline: aux losses and expert loads
    per_mb = Terms()
    if first:
        per_mb.merge(embedding(mb))
    if checkpointing:
        per_mb.merge(checkpointed_layer(cfg, mb), times=count)
        if pp > 1:
            per_mb.add("checkpoint.carry", carry * count)
    else:
        # the single-device model shares one RoPE table; each pipeline layer computes its own
        per_mb.merge(rope_tables(cfg, mb), times=count if pp > 1 else 1)
        for layer, times in kinds.items():
            per_mb.merge(decoder_layer(cfg, mb, layer=layer), times=times)
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
        headroom = skew * (min(moe_count, 1) if checkpointing else moe_count * in_flight)
    if checkpointing and count:
        saved += recomputed_layer(cfg, mb, rope_inside=pp > 1, layers=layers)
    return StageActivations(
        saved_bytes=saved,
        held_bytes=held.total * in_flight,
        imbalance_headroom_bytes=headroom,
        head_transient_bytes=head_backward_transient(cfg, mb) if last else 0,
        in_flight=in_flight,
        per_micro_batch={**per_mb.items, **held.items},
    )
