"""Step time, throughput and MFU of a recipe's strategy from its hardware figures (a roofline model, no GPU needed).

Sources: the FLOP counts follow Narayanan et al. 2021 (Megatron-LM, "Efficient Large-Scale Language Model Training
on GPU Clusters", appendix: 2 FLOPs per multiply-add, backward = 2x forward, full recompute = one more forward) with
the causal halving of the attention scores as in Megatron's `num_floating_point_operations`; a GEMM's time is
`kernels.gemm_seconds`: the roofline `max(FLOPs / (peak * mfu), bytes / (hbm_bandwidth * utilisation))` (Williams
et al. 2009, as used by SimuMax and Calculon) with its rate cut by the GEMM's tile and wave quantisation and its K
depth, plus one kernel's fixed cost (`hardware.gpu`'s figures, devices.py; without a named card every GEMM runs at
`mfu` and kernels cost nothing, the plain roofline); ring collectives move `2 (N-1)/N` of the buffer per rank for
all-reduce and `(N-1)/N` for reduce-scatter or all-gather (Patarasuk & Yuan 2009); the 1F1B pipeline takes
`(m + pp - 1)` slots of the slowest stage, a bubble of `(pp - 1) / (m + pp - 1)` (Narayanan et al. 2021). See
/work/shared/REFERENCES.md.

Symbols: B micro-batch, S sequence, T = B*S tokens of a micro-batch, D hidden, Dq = Hq*d, Dkv = Hkv*d, E experts,
k top-k, I a routed expert's FFN width (`MoEConfig.expert_width`), I_s the shared experts' one FFN (`shared_width`,
0: none), I_d a dense FFN layer's (`intermediate_size`), g = 2 matrices (two-matrix gelu FFN) or 3 (gated silu),
V vocabulary, b bytes of the compute dtype, t = tp, e = ep. The model's shape is read once (`shape_of`): its widths
and its layers' rows (`shapes.layer_table`); a layer is an MoE layer or a dense FFN layer (`dense_layers`), and every
stage is priced by its own layers of each kind (`stage_kinds`). Per decoder layer, per micro-batch, per rank (FLOPs
of the forward pass):
    q, k, v projections   2*T*D*(Dq + 2*Dkv) / t
    o projection          2*T*Dq*D / t
    SDPA (causal)         scores Q K^T 2*B*S^2*Dq/t and values P V 2*B*S^2*Dq/t, each halved for causality
    router                2*T*D*E (replicated on the tp ranks, as the gate is)
    experts               2*R*D*I*g, R rows (`traffic.expert_rows`). Legacy backend: with ep = 1 the model's own
                          block runs the T*k routed copies (or what the capacity keeps) on every tp rank (redundant
                          work, modelled as it really runs); with ep > 1 DeepSpeed's MoE layer runs every expert's
                          buffer at its full depth C (the busiest expert's load, dropless, or the capacity),
                          R = E*C/t: equal to T*k/t only when routing is balanced. AutoEP backend: the grouped GEMMs
                          run the routed rows the busiest rank receives, each local expert's rounded up to 8, no
                          capacity padding (traffic.py)
    shared experts        2*T*D*I_s*g + 2*T*D (its D -> 1 gate, `shared_expert_gate`), MoE layers only, every token
                          on every tp rank (replicated over tp like the norms, beside DeepSpeed's layer too)
    dense FFN (dense layer)  2*T*D*I_d*g on every tp rank (replicated); a dense layer has no router, experts, shared
                          experts, all-to-all or dispatch
    LM head (last stage)  2*T*D*V (not vocabulary-parallel: each tp rank computes all of it)
Every GEMM above is priced by its own shape (`layer_gemms`: q, k, v, o; gate+up then down of each FFN; each local
expert's slice at the rank's mean rows R / (E/e), one grouped kernel on the model's block and AutoEP, one kernel per
expert in DeepSpeed's expert modules), bytes of [M, K] x [K, N] b*(M*K + K*N + M*N); its backward the two transposed
products (dX: M x K of depth N; dW: K x N of depth M: an expert's weight gradient is as deep as its few rows). SDPA
(fused): read q, k, v and write the output, at `hardware.attention_efficiency` of the peak (FlashAttention's; None:
`mfu`), its backward 2.5x the forward's FLOPs (the scores recomputed: five S x S products to the forward's two).
Memory-bound element-wise work per layer (bytes only): two RMSNorms and two residual adds (10*b*T*D), RoPE on q and
k (2*b*T*(Dq + Dkv)/t); an MoE layer's router softmax/top-k (8*T*E, sigmoid and groups alike), dispatch gather and
combine scatter (4*b*R*D), the expert activation (g*b*R*I); the shared FFN's activation (g*b*T*I_s), its sum into the
routed output (3*b*T*D) and gate scaling (2*b*T*D); a dense layer's FFN activation (g*b*T*I_d); q/k norms
(`qk_norm`, 2*b*T*(Dq + Dkv)/t), the q, k, v clamp (`clip_qkv`, 2*b*T*(Dq + 2*Dkv)/t); per micro-batch the embedding
(2*b*T*D) and the fp32 log-softmax/loss (12*T*V). Biases (`attention_bias`, `attention_out_bias`) are parameters
(gradients, optimizer, ZeRO-3 gathers), not roofline terms (one row beside a projection's weight). Every kernel that
is not a GEMM (norms, RoPE, routing's softmax/top-k/sort, the permutation's gathers and scatters, the grouped GEMM's
offsets) costs at least one kernel's fixed cost: the counts per layer, forward and backward, are counted by running
the model's own code (`kernels.counted_kernels`) and added times `hardware.kernel_launch_us` to the bytes' time.
Element-wise backward = 2x the forward's bytes; activation checkpointing adds one forward of every decoder layer.

Communication (per micro-batch unless said), `link(span)`: the links a group uses, by the rank layout
rank = (pipe*dp + data)*tp + model with `gpus_per_node` consecutive ranks per node:
    TP all-reduce         2 forward + 2 backward per MoE layer (+2 with recompute) of b*T*D, 2(t-1)/t of it over
                          intra-node links (tp stays inside a node: a layout rule); a dense layer the attention's
                          only, 1 forward + 1 backward (+1 with recompute)
    EP all-to-all         dispatch + combine, forward and backward: 4 per MoE layer (+2 with recompute) of
                          R_a2a*D*b per rank, (e-1)/e of it leaving the rank: legacy, the whole buffers (R = E*C/t
                          as above); AutoEP, a variable-split all-to-all of the routed rows only, the rows the
                          busiest rank receives before the rounding (`traffic.autoep_rows`; T*k when balanced).
                          DeepSpeed's expert groups are e consecutive ranks: q = min(e, gpus_per_node) share a node;
                          time = max(bytes*(q-1)/e / intra, bytes*(e-q)/e / inter)
    PP point-to-point     one activation forward and one gradient backward of b*T*D per stage boundary; inter-node
                          when the tp*dp*pp ranks of a replica chain span more than one node
    DP reduction          dense gradients over dp, expert gradients over the expert-data-parallel group dp/e, over
                          the group's span tp*dp, when DeepSpeed runs them (`traffic.data_parallel_traffic`), P the
                          stage's own parameters (its layers' rows, `traffic.stage_params`): ZeRO-0
                          all-reduce and ZeRO-1 reduce-scatter + all-gather of the updated weights at the step,
                          2(N-1)/N * b*P; ZeRO-2 reduce-scatter after every micro-batch's backward and the weights'
                          all-gather after the step, (m+1)(N-1)/N * b*P; ZeRO-3 the reduce-scatter per micro-batch
    ZeRO-3 gathers        every partitioned parameter all-gathered in each micro-batch's forward and again in its
                          backward where the reuse distance released it, (N-1)/N * b per element; persistent (small)
                          parameters re-gathered once after the step (traffic.py states when DeepSpeed gathers)
    optimizer step        memory-bound: 28 bytes per partitioned element (fp32 master, m, v read and written, the fp32
                          gradient read) plus writing the b-byte weights (ZeRO-3: the partition's only)
A stage's per-micro-batch time: its MoE layers x (an MoE layer's forward times (3 + recompute) + its TP and EP
collectives) + its dense layers x (a dense layer's likewise, TP only) + the embedding (first) / LM head (last) and the
PP point-to-point. A step: (m + pp - 1) * (slowest stage's per-micro-batch time) + (slowest stage's DP collectives,
ZeRO-3 gathers and optimizer step) + `hardware.step_overhead_ms`, m = global_batch / (micro_batch * dp)
micro-batches per data-parallel rank. The last term is what a step costs whatever the model's size (op dispatch,
DeepSpeed's engine, collective latencies): `moe calibrate` measures it as the step time of the same layout with every
width shrunk to almost nothing.

Overlap assumptions (stated, conservative, DeepSpeed's defaults): nothing overlaps compute. TP all-reduces and EP
all-to-alls are synchronous inside the layer; pipeline sends are blocking in DeepSpeed's PipelineEngine; gradient
reduction and ZeRO-3's gathers are exposed (`overlap_comm` false; stage 3's prefetch is not counted as hiding them).
Routing: with ep > 1 and dropless routing the legacy layer's experts and all-to-alls run buffers as deep as the
busiest expert's load, `imbalance` times the mean (the estimator's assumption, 3 early in training, `--imbalance`;
`moe calibrate` reports what a short run of the layout showed); AutoEP's busiest rank receives that expert's load and
its other experts' share of the rest (traffic.py); with ep = 1 imbalance costs nothing here (the sort-based block
runs exactly the routed rows). MFU = model FLOPs (3x the forward of every token through every layer as it is, MoE
or dense, no recompute, no redundant tp work) / (step time * GPUs * peak); tests/test_perf.py holds its forward to
torch's FlopCounterMode on the real model (tiny Qwen2-MoE- and GLM-4.5-shaped configs).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from ..recipe import Recipe, RecipeError
from ..strategy import Strategy
from .memory import PRECISION_BYTES, stage_layers, stage_ranges
from .shapes import layer_table
from .kernels import NO_KERNELS, KernelCounts, counted_kernels, gemm_backward_seconds, gemm_seconds
from .traffic import NO_LAYER, Zero3Settings, data_parallel_traffic, expert_rows, stage_params


@dataclass(frozen=True)
class Shape:
    """The model and hardware figures the time model needs (hashable, so results can be cached)."""

    D: int
    Dq: int
    Dkv: int
    E: int
    k: int
    I: int
    g: int
    V: int
    L: int
    tied: bool
    S: int
    global_batch: int
    b: int
    compute_flops: float  # peak * mfu, FLOP/s
    hbm_bytes_s: float  # bandwidth * utilisation, B/s
    gpus_per_node: int
    intra_bytes_s: float
    inter_bytes_s: float
    peak_flops: float
    overhead_s: float = 0.0  # fixed per step (hardware.step_overhead_ms)
    capacity_factor: float = 0.0  # 0: dropless
    min_capacity: int = 4
    imbalance: float = 1.0  # busiest expert's load over the mean (dropless DeepSpeed buffers are that deep)
    zero3: Zero3Settings = Zero3Settings()  # DeepSpeed's stage-3 gather settings (traffic.py)
    # the families' blocks (`MoEConfig`; the defaults are Mixtral's block)
    I_dense: int = 0  # a dense FFN layer's width (`intermediate_size`)
    I_shared: int = 0  # the shared experts' one FFN (`MoEConfig.shared_width`; 0: none)
    shared_gate: bool = False  # its D -> 1 sigmoid gate
    dense_layers: tuple[int, ...] = ()  # the dense FFN layers' indices
    qk_norm: bool = False  # an RMSNorm over q and k (per head or over the projection)
    clip_qkv: bool = False  # q, k, v clamped
    rows: tuple = ()  # (an MoE layer's, a dense layer's `shapes.LayerShape`), `layer_table`'s; (): from the widths
    attention_small: tuple = ((), ())  # the attention's biases and q/k norms, numel: (split over tp, whole on each)
    mla: tuple = ()  # multi-head latent attention: (H, q_lora_rank or 0, kv_lora_rank, n, r, v); (): none
    # GEMM time by shape and per-kernel cost (`kernels.py`, `hardware.*`; the defaults: the one-efficiency roofline)
    sm_count: int = 0
    gemm_tile: tuple = (1, 1)
    gemm_k_half: float = 0.0
    launch_s: float = 0.0
    attention_efficiency: float = 0.0  # fraction of the peak the fused attention reaches; 0: compute_flops
    kernels: KernelCounts = NO_KERNELS  # the kernels other than GEMMs a layer launches (counted when launch_s > 0)


def shape_of(recipe: Recipe, imbalance: float = 1.0, zero3: Zero3Settings = Zero3Settings()) -> Shape:
    """The model's derived shape, read once from its `MoEConfig`: the widths, and its layers' rows (`layer_table`:
    every MoE layer's row is the same, and every dense layer's)."""
    hw, t = recipe.hardware, recipe.train
    cfg = recipe.moe_config()
    table = layer_table(cfg)
    rows = (next(row for row in table if row.moe), next((row for row in table if not row.moe), NO_LAYER))
    Dq, Dkv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    norms = {None: (), "head": (cfg.head_dim, cfg.head_dim), "projection": (Dq, Dkv)}[cfg.qk_norm]
    small = ((Dq, Dkv, Dkv) if cfg.attention_bias else (), ((cfg.hidden_size,) if cfg.attention_out_bias else ()) + norms)
    return Shape(D=cfg.hidden_size, Dq=Dq, Dkv=Dkv, E=cfg.num_local_experts, k=cfg.num_experts_per_tok,
                 I=cfg.expert_width, g=3 if cfg.hidden_act == "silu" else 2, V=cfg.vocab_size,
                 L=cfg.num_hidden_layers, tied=cfg.tie_word_embeddings, S=t.seq_len, global_batch=t.global_batch_size,
                 b=PRECISION_BYTES[t.precision], compute_flops=hw.peak_tflops * 1e12 * hw.mfu,
                 hbm_bytes_s=hw.hbm_bandwidth_tbps * 1e12 * hw.bandwidth_utilization,
                 gpus_per_node=hw.gpus_per_node, intra_bytes_s=hw.intra_node_gbps * 1e9,
                 inter_bytes_s=hw.inter_node_gbps * 1e9, peak_flops=hw.peak_tflops * 1e12,
                 overhead_s=hw.step_overhead_ms * 1e-3, capacity_factor=cfg.capacity_factor or 0.0,
                 min_capacity=cfg.min_capacity, imbalance=imbalance, zero3=zero3,
                 I_dense=cfg.intermediate_size if cfg.dense_layers else 0, I_shared=cfg.shared_width,
                 shared_gate=bool(cfg.shared_width and cfg.shared_expert_gate),
                 dense_layers=tuple(cfg.dense_layers), qk_norm=cfg.qk_norm is not None,
                 clip_qkv=cfg.clip_qkv is not None, rows=rows, attention_small=small,
                 mla=(cfg.num_attention_heads, cfg.q_lora_rank or 0, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                      cfg.qk_rope_head_dim, cfg.v_head_dim) if cfg.mla else (),
                 sm_count=hw.sm_count, gemm_tile=tuple(hw.gemm_tile), gemm_k_half=hw.gemm_k_half,
                 launch_s=hw.kernel_launch_us * 1e-6, attention_efficiency=hw.attention_efficiency or 0.0,
                 kernels=counted_kernels(cfg) if hw.kernel_launch_us else NO_KERNELS)


@functools.lru_cache(maxsize=None)
def stage_shape(num_layers: int, pp: int) -> tuple[int, int, int]:
    """(layers of the first stage, of the last stage, most layers of a middle stage) as DeepSpeed splits them."""
    layers = stage_layers(num_layers, pp)
    if pp == 1:
        return layers[0], 0, 0
    return layers[0], layers[-1], max(layers[1:-1], default=0)


@functools.lru_cache(maxsize=None)
def stage_kinds(num_layers: int, dense_layers: tuple[int, ...], pp: int) -> tuple[tuple[int, int], ...]:
    """(decoder layers, dense FFN layers among them) of the first stage, of the last (pp 1: none), then of each kind
    of middle stage no other middle stage outnumbers in both (the only ones that can be the slowest), as DeepSpeed
    splits the layers (`memory.stage_ranges`)."""
    kinds = [(len(held), sum(1 for i in held if i in dense_layers)) for held in stage_ranges(num_layers, pp)]
    if pp == 1:
        return kinds[0], (0, 0)
    middle = set(kinds[1:-1])
    top = sorted(k for k in middle if not any(o != k and o[0] - o[1] >= k[0] - k[1] and o[1] >= k[1] for o in middle))
    return (kinds[0], kinds[-1], *top)


def stage_table(s: Shape, max_pp: int) -> np.ndarray:
    """`stage_kinds` of every pp up to `max_pp` as one int array indexed [row, pp] (what `step_components` reads for a
    grid of strategies): rows 2j and 2j+1 the layers and dense layers of kind j (first, last, the middle kinds; a
    kind a pp lacks is 0 layers). Read-only (cached)."""
    return _stage_table(s.L, s.dense_layers, max_pp)


@functools.lru_cache(maxsize=None)
def _stage_table(num_layers: int, dense_layers: tuple[int, ...], max_pp: int) -> np.ndarray:
    kinds = [stage_kinds(num_layers, dense_layers, pp) for pp in range(1, max_pp + 1)]
    table = np.zeros((2 * max(len(k) for k in kinds), max_pp + 1), dtype=np.int64)
    for pp, kind in enumerate(kinds, start=1):
        table[:len(kind) * 2, pp] = [n for pair in kind for n in pair]
    table.flags.writeable = False
    return table


def mla_widths(s: Shape, run: bool = True, tp=1) -> dict:
    """Multi-head latent attention's widths per token (`Shape.mla`), summed over this rank's H/tp heads: `q` the
    queries and keys (H*(n + r)), `v` the values SDPA runs (H*v, or H*(n + r) where `run` and the fused kernel gets v
    zero-padded to q's width: `modeling.MoEMLAttention`), `out` o_proj's input (H*v); `proj` the projections'
    weights (q or q_b, and kv_b, split by heads; q_a and kv_a whole on every rank) and `act` their outputs (and the
    low-rank ones' inputs)."""
    H, q_rank, c, n, r, v = s.mla
    h, q = H / tp, n + r
    q_w = q_rank * (s.D + h * q) if q_rank else s.D * h * q
    return {"q": h * q, "v": h * (max(v, q) if run else v), "out": h * v,
            "proj": q_w + s.D * (c + r) + c * h * (n + v),
            "act": (2 * q_rank if q_rank else 0) + h * q + (c + r) + c + h * (n + v)}


def layer_forward_flops(s: Shape, B, tp, ep, autoep=False, dense: bool = False, run: bool = True):
    """Forward FLOPs of one decoder layer on one rank, by op (works on numbers and on numpy arrays alike); `autoep`
    (bool or 0/1 array): the experts run on DeepSpeed's AutoEP layer, else the legacy path (traffic.expert_rows).
    An MoE layer, or with `dense` a dense FFN layer (no router, experts or shared experts). Multi-head latent
    attention (`mla_widths`): its projections, and SDPA's values at the width that runs (`run`) or is useful."""
    T = B * s.S
    moe = not dense
    R = expert_rows(s, T, tp, ep, s.imbalance, autoep)[0] if moe else 0.0
    if s.mla:
        w = mla_widths(s, run, tp)
        qkv, o_proj = 2.0 * T * w["proj"], 2.0 * T * w["out"] * s.D
        sdpa = (2.0 * B * s.S * s.S * (w["q"] + w["v"])) * 0.5
    else:
        qkv, o_proj = 2.0 * T * s.D * (s.Dq + 2 * s.Dkv) / tp, 2.0 * T * s.Dq * s.D / tp
        sdpa = 2 * (2.0 * B * s.S * s.S * s.Dq / tp) * 0.5
    return {
        "qkv": qkv,
        "o_proj": o_proj,
        "sdpa": sdpa,
        "router": 2.0 * T * s.D * s.E * moe,
        "experts": 2.0 * R * s.D * s.I * s.g,
        "shared_experts": (2.0 * T * s.D * s.I_shared * s.g + 2.0 * T * s.D * s.shared_gate) * moe,
        "dense_ffn": 2.0 * T * s.D * s.I_dense * s.g * dense,
    }


def layer_gemms(s: Shape, B, tp, ep, autoep=False, dense: bool = False) -> dict:
    """The GEMMs of one decoder layer's forward on one rank, by op: lists of (M, N, K, groups, grouped) for
    `kernels.gemm_seconds` ([M, K] x [K, N], `groups` of them, one grouped kernel or one per group). As the model
    runs them: q, k, v and o separate (or MLA's low-rank pairs), the experts' gate and up fused into one [D, 2I]
    product per expert then down, grouped (`torch._grouped_mm`) on the model's own block and AutoEP, one kernel per
    expert in DeepSpeed's expert modules (legacy, ep > 1); each local expert at the rank's mean rows R / (E / e)."""
    T = B * s.S
    if s.mla:
        H, q_rank, c, n, r, v = s.mla
        h = H / tp
        q = [(T, q_rank, s.D, 1, True), (T, h * (n + r), q_rank, 1, True)] if q_rank else [(T, h * (n + r), s.D, 1, True)]
        qkv = q + [(T, c + r, s.D, 1, True), (T, h * (n + v), c, 1, True)]
        o_proj = [(T, s.D, h * v, 1, True)]
    else:
        qkv = [(T, s.Dq / tp, s.D, 1, True), (T, s.Dkv / tp, s.D, 1, True), (T, s.Dkv / tp, s.D, 1, True)]
        o_proj = [(T, s.D, s.Dq / tp, 1, True)]

    def ffn(rows, width, groups=1, grouped=True):  # gate (gated FFNs) and up, then down
        return [(rows, (s.g - 1) * width, s.D, groups, grouped), (rows, s.D, width, groups, grouped)]

    ops = {"qkv": qkv, "o_proj": o_proj, "router": [], "experts": [], "shared_experts": [], "dense_ffn": []}
    if dense:
        ops["dense_ffn"] = ffn(T, s.I_dense)
        return ops
    local = s.E / ep
    R = expert_rows(s, T, tp, ep, s.imbalance, autoep)[0]
    legacy_loop = np.logical_and(np.logical_not(autoep), ep > 1)
    ops["router"] = [(T, s.E, s.D, 1, True)]
    ops["experts"] = ffn(R / local, s.I, local, np.logical_not(legacy_loop))
    if s.I_shared:
        ops["shared_experts"] = ffn(T, s.I_shared) + ([(T, 1, s.D, 1, True)] if s.shared_gate else [])
    return ops


def _attention_rate(s: Shape) -> float:
    return s.peak_flops * s.attention_efficiency if s.attention_efficiency else s.compute_flops


def layer_times(s: Shape, B, tp, ep, autoep=False, dense: bool = False) -> tuple[dict, dict]:
    """(forward, backward) seconds of one decoder layer on one rank, by op class: an MoE layer, or with `dense` a
    dense FFN layer. GEMMs by shape (`layer_gemms`, `kernels.gemm_seconds`; backward the two transposed products),
    SDPA at the fused attention's rate (`hardware.attention_efficiency`; backward 2x), element-wise work by bytes plus
    one kernel cost per counted kernel (`kernels.counted_kernels`; backward 2x the bytes)."""
    T = B * s.S
    moe = not dense
    R = expert_rows(s, T, tp, ep, s.imbalance, autoep)[0] if moe else 0.0
    b = s.b
    forward, backward = {}, {}
    for name, gemms in layer_gemms(s, B, tp, ep, autoep, dense).items():
        forward[name] = sum((gemm_seconds(s, *g) for g in gemms), 0.0)
        backward[name] = sum((gemm_backward_seconds(s, *g) for g in gemms), 0.0)
    sdpa_flops = layer_forward_flops(s, B, tp, ep, autoep, dense)["sdpa"]
    sdpa_bytes = b * T * (2.0 * s.Dq + 2 * s.Dkv) / tp  # SDPA (fused): read q, k, v, write the output
    if s.mla:
        w = mla_widths(s, tp=tp)
        sdpa_bytes = b * T * (2.0 * w["q"] + 2.0 * w["v"])
    # the fused kernel's backward recomputes the scores: five S x S products to the forward's two, 2.5x its FLOPs
    # (Dao 2023, FlashAttention-2, which counts its backward's speed so)
    forward["sdpa"] = np.maximum(sdpa_flops / _attention_rate(s), sdpa_bytes / s.hbm_bytes_s) + s.launch_s
    backward["sdpa"] = np.maximum(2.5 * sdpa_flops / _attention_rate(s), 2.0 * sdpa_bytes / s.hbm_bytes_s) + s.launch_s
    qkv_w = s.Dq + 2 * s.Dkv
    Is, Id = s.I_shared * moe, s.I_dense * dense
    # RoPE on q and k: MLA's rotating parts (every head's r dims of q, the one shared r of k) and its two RMSNorms
    rope = (2.0 * b * T * (s.mla[0] / tp + 1) * s.mla[4] + 4.0 * b * T * (s.mla[1] + s.mla[2]) if s.mla
            else 2.0 * b * T * (s.Dq + s.Dkv) / tp)
    elementwise = 10.0 * b * T * s.D + rope
    if moe:
        elementwise = elementwise + 8.0 * T * s.E + 4.0 * b * R * s.D + s.g * b * R * s.I
    # the families' element-wise work: q/k norms, the clamp, the shared FFN's activation, its gate and its sum into
    # the routed output, a dense FFN's activation
    extra = (2.0 * b * T * (s.Dq + s.Dkv) / tp * s.qk_norm + 2.0 * b * T * qkv_w / tp * s.clip_qkv
             + s.g * b * T * (Is + Id) + (3.0 + 2.0 * s.shared_gate) * b * T * s.D * bool(Is))
    kernels_fwd, kernels_bwd = s.kernels.dense if dense else s.kernels.moe
    forward["elementwise"] = (elementwise + extra) / s.hbm_bytes_s + kernels_fwd * s.launch_s
    backward["elementwise"] = 2.0 * (elementwise + extra) / s.hbm_bytes_s + kernels_bwd * s.launch_s
    return forward, backward


def layer_pass_times(s: Shape, B, tp, ep, autoep=False, dense: bool = False, ckpt=False) -> dict:
    """Seconds per micro-batch of one decoder layer by op class: forward (twice with activation checkpointing: the
    recompute) and backward."""
    forward, backward = layer_times(s, B, tp, ep, autoep, dense)
    again = 1.0 + np.asarray(ckpt, dtype=float)
    return {name: forward[name] * again + backward[name] for name in forward}


def head_time(s: Shape, B):
    """Forward + backward seconds of the LM head (its GEMM by shape, the fp32 log-softmax/loss 12*T*V bytes each
    way) and of the rest of the model's kernels (`KernelCounts.edges`)."""
    T = B * s.S
    gemm = gemm_seconds(s, T, s.V, s.D) + gemm_backward_seconds(s, T, s.V, s.D)
    return gemm + 3.0 * 12.0 * T * s.V / s.hbm_bytes_s + sum(s.kernels.edges) * s.launch_s


def embedding_time(s: Shape, B):
    """Forward + backward seconds of the embedding (a gather of T*D, its gradient's scatter 2x)."""
    return 3.0 * 2.0 * s.b * B * s.S * s.D / s.hbm_bytes_s


def stage_compute_time(s: Shape, B, tp, ep, layers: int, ckpt: bool = False, autoep: bool = False,
                       dense_layers: int = 0):
    """Forward + backward (+ recompute) of `layers` decoder layers (`dense_layers` of them dense FFN layers), the
    embedding and the LM head on one rank, one micro-batch, no communication: the work `moe calibrate` times on this
    machine."""
    dense = (dense_layers * sum(layer_pass_times(s, B, tp, ep, autoep, True, ckpt).values()) if dense_layers else 0.0)
    return ((layers - dense_layers) * sum(layer_pass_times(s, B, tp, ep, autoep, False, ckpt).values()) + dense
            + head_time(s, B) + embedding_time(s, B))


def step_components(s: Shape, tp, pp, ep, dp, zero, B, ckpt, pp_table=None, autoep=False):
    """Every term of the step time (seconds), for scalars or equal-length numpy arrays of strategies.

    `pp_table`: `stage_table(s, max_pp)` (arrays path); without it that table is built for `pp` (scalar path): each
    stage kind's decoder layers and dense layers, a stage's time the sum of its MoE layers' and its dense layers'.
    `autoep`: the experts run on DeepSpeed's AutoEP layer (bool or 0/1 array), else on the legacy path."""
    ckpt = np.asarray(ckpt, dtype=float)
    kinds = (stage_table(s, int(pp)) if pp_table is None else pp_table)[:, pp]
    kinds = [(kinds[2 * j], kinds[2 * j + 1]) for j in range(len(kinds) // 2)]  # (layers, dense layers) per kind
    T = B * s.S
    m = s.global_batch / (B * dp)
    lt = layer_pass_times(s, B, tp, ep, autoep, False, ckpt)  # forward (+ recompute) + backward, by op
    layer_t = sum(lt.values())
    head_t, emb_t = head_time(s, B), embedding_time(s, B)
    # communication per layer per micro-batch
    act = s.b * T * s.D
    tp_comm = (4.0 + 2 * ckpt) * 2.0 * (tp - 1) / tp * act / s.intra_bytes_s
    # legacy (ep > 1): whole capacity-deep buffers; AutoEP: the routed rows the busiest rank receives
    a2a = expert_rows(s, T, tp, ep, s.imbalance, autoep)[1] * s.D * s.b
    q = np.minimum(ep, s.gpus_per_node)
    ep_comm = np.where(ep > 1, (4.0 + 2 * ckpt) * np.maximum(a2a * (q - 1) / ep / s.intra_bytes_s,
                                                             a2a * (ep - q) / ep / s.inter_bytes_s), 0.0)
    p2p_bw = np.where(tp * dp * pp <= s.gpus_per_node, s.intra_bytes_s, s.inter_bytes_s)
    p2p = np.where(pp > 1, 2.0 * act / p2p_bw, 0.0)
    per_layer = layer_t + tp_comm + ep_comm
    # a dense FFN layer: no router, experts or all-to-all; only the attention's two tp all-reduces (one forward, one
    # backward, + the recomputed forward's)
    if s.dense_layers:
        dense_lt = layer_pass_times(s, B, tp, ep, autoep, True, ckpt)
        tp_comm_dense = (2.0 + ckpt) * 2.0 * (tp - 1) / tp * act / s.intra_bytes_s
        per_dense = sum(dense_lt.values()) + tp_comm_dense
    else:
        dense_lt, tp_comm_dense, per_dense = dict.fromkeys(lt, 0.0), 0.0, 0.0
    layers_t = [(n - d) * per_layer + d * per_dense for n, d in kinds]  # each stage kind's decoder layers
    single = pp == 1
    first_t = np.where(single, layers_t[0] + head_t + emb_t, layers_t[0] + emb_t + p2p)
    last_t = np.where(single, 0.0, layers_t[1] + head_t + p2p)
    mid_t = 0.0
    for (n, _), t in zip(kinds[2:], layers_t[2:]):
        mid_t = np.maximum(mid_t, np.where(n > 0, t + p2p, 0.0))
    stage_t = np.maximum(first_t, np.maximum(last_t, mid_t))
    pipeline = (m + pp - 1) * stage_t
    slow = np.argmax(np.stack([np.broadcast_to(t, np.shape(stage_t)) for t in layers_t]), axis=0)
    slow_layers, slow_dense = (np.choose(slow, [np.broadcast_to(k[i], np.shape(stage_t)) for k in kinds])
                               for i in (0, 1))
    # the data-parallel collectives (traffic.py: per step at ZeRO-0/1, per micro-batch at ZeRO-2/3, ZeRO-3's
    # parameter gathers) and the optimizer step, of the slowest stage, each stage's own parameters
    dp_bw = np.where(tp * dp <= s.gpus_per_node, s.intra_bytes_s, s.inter_bytes_s)
    ne = dp / ep
    tails = []
    ends = [(1, np.where(single, 1, 0)), (0, 1)] + [(0, 0)] * (len(kinds) - 2)
    for (layers, dense_layers), (first, last) in zip(kinds, ends):
        dense, expert = stage_params(s, layers=layers, first=first, last=last, tp=tp, ep=ep, dense_layers=dense_layers)
        traffic = data_parallel_traffic(s, s.b, layers=layers, first=first, last=last, tp=tp, ep=ep, dp=dp,
                                        zero=zero, ckpt=ckpt, autoep=autoep, zero3=s.zero3,
                                        dense_layers=dense_layers)
        reduce_bytes, gather_bytes = traffic.per_step(m)
        reduce, gather = reduce_bytes / dp_bw, gather_bytes / dp_bw
        part = np.where(zero >= 1, dense / dp + expert / ne, dense + expert)
        written = np.where(zero >= 3, part, dense + expert)  # the b-byte weights the step writes
        opt = (28.0 * part + s.b * written) / s.hbm_bytes_s
        tails.append((reduce, gather, opt, reduce + gather + opt))
    tail_i = np.argmax(np.stack([np.broadcast_to(t[3], np.shape(stage_t)) for t in tails]), axis=0)
    pick = lambda j: np.choose(tail_i, [np.broadcast_to(t[j], np.shape(stage_t)) for t in tails])  # noqa: E731
    dp_reduce, zero3_gather, optimizer = pick(0), pick(1), pick(2)
    step = pipeline + dp_reduce + zero3_gather + optimizer + s.overhead_s
    return {"step": step, "pipeline": pipeline, "stage_t": stage_t, "m": m, "layer_t": layer_t,
            "layer_times": lt, "tp_comm": tp_comm, "ep_comm": ep_comm, "p2p": p2p, "head_t": head_t,
            "emb_t": emb_t, "dp_reduce": dp_reduce, "zero3_gather": zero3_gather, "optimizer": optimizer,
            "dense_layer_times": dense_lt, "tp_comm_dense": tp_comm_dense,
            "first_t": first_t, "last_t": last_t, "mid_t": mid_t, "slow_layers": slow_layers,
            "slow_dense_layers": slow_dense}


def model_flops_per_step(s: Shape) -> float:
    """Useful FLOPs of a step: 3x the forward of every token (no recompute, no redundant tp work), each layer as it
    is: an MoE layer (router, the routed copies R = S*k, shared experts) or a dense FFN layer."""
    per_layer = sum(layer_forward_flops(s, 1, 1, 1, run=False).values())  # the routed copies only: R = S*k
    dense = len(s.dense_layers)
    per_dense = float(sum(layer_forward_flops(s, 1, 1, 1, dense=True, run=False).values())) if dense else 0.0
    forward = (s.L - dense) * float(per_layer) + dense * per_dense + 2.0 * s.S * s.D * s.V
    return 3.0 * s.global_batch * forward


def _changed(recipe: Recipe, world_size: int | None, changes: dict) -> Strategy:
    stated = Strategy.of(recipe.parallel)
    strategy = stated.replace(**changes)
    if "dp" in changes:
        return strategy
    if (strategy.tp, strategy.pp) != (stated.tp, stated.pp):
        return strategy.replace(dp=strategy.ep)
    problem = stated.world_problem(world_size)
    if problem:
        raise RecipeError(*problem)
    return strategy.replace(dp=stated.resolved(world_size)[0].dp)


@dataclass(frozen=True)
class Performance:
    step_time_s: float
    throughput_seq_per_s: float
    throughput_tokens_per_s: float
    mfu: float
    gpus: int
    micro_batches: float
    bubble_fraction: float
    breakdown: dict  # seconds per step, each term
    per_micro_batch: dict  # seconds on the slowest stage per micro-batch
    assumptions: dict
    moe_backend: str = "legacy"  # the backend priced: autoep or legacy (`Strategy.with_backend`)

    def as_json(self) -> dict:
        return {"step_time_s": self.step_time_s, "throughput_seq_per_s": self.throughput_seq_per_s,
                "throughput_tokens_per_s": self.throughput_tokens_per_s, "mfu": self.mfu, "gpus": self.gpus,
                "micro_batches_per_step": self.micro_batches, "bubble_fraction": self.bubble_fraction,
                "breakdown_s": self.breakdown, "per_micro_batch_s": self.per_micro_batch,
                "assumptions": self.assumptions, "moe_backend": self.moe_backend}


def performance(recipe: Recipe, world_size: int | None = None, *, strategy: Strategy | None = None,
                imbalance: float | None = None, zero3: Zero3Settings | None = None, **changes) -> Performance:
    """Step time of `recipe`'s strategy on `world_size` GPUs, of another `strategy` (dp set), or of the recipe's with
    `changes` to `Strategy` fields (dp then defaults to ep where tp or pp change). `imbalance`: the busiest expert's
    load over the mean, `zero3`: DeepSpeed's stage-3 settings (defaults: the estimator's assumptions). A strategy
    breaking a layout rule is a `RecipeError`."""
    from .memory import Assumptions, zero3_settings

    if strategy is None:
        strategy = _changed(recipe, world_size, {name: v for name, v in changes.items() if v is not None})
    recipe.check_strategy(strategy)
    strategy = strategy.with_backend(recipe.model)
    autoep = strategy.moe_backend == "autoep"
    tp, pp, ep, dp = strategy.tp, strategy.pp, strategy.ep, strategy.dp
    zero, B, ckpt = strategy.zero_stage, strategy.micro_batch_size, strategy.activation_checkpointing
    imbalance = Assumptions().imbalance if imbalance is None else imbalance
    s = shape_of(recipe, imbalance, zero3_settings(Assumptions()) if zero3 is None else zero3)
    c = step_components(s, tp, pp, ep, dp, zero, B, ckpt, autoep=autoep)
    step = float(c["step"])
    gpus = tp * pp * dp
    m = float(c["m"])
    # the stage whose decoder layers take longest: its MoE layers' and dense layers' terms
    slow_dense = float(c["slow_dense_layers"])
    slow_moe = float(c["slow_layers"]) - slow_dense
    dense_lt = c["dense_layer_times"]
    priced = {"shared_experts": s.I_shared, "dense_ffn": s.dense_layers}  # terms shown only where the model has them
    per_mb = {f"compute.{name}": float(v) * slow_moe + float(dense_lt[name]) * slow_dense
              for name, v in c["layer_times"].items() if priced.get(name, True)}
    per_mb["compute.lm_head_and_embedding"] = float(c["head_t"] + c["emb_t"])
    per_mb["comm.tp_all_reduce"] = float(c["tp_comm"]) * slow_moe + float(c["tp_comm_dense"]) * slow_dense
    per_mb["comm.ep_all_to_all"] = float(c["ep_comm"]) * slow_moe
    per_mb["comm.pp_p2p"] = float(c["p2p"])
    stage_t = float(c["stage_t"])
    busy = m * stage_t
    breakdown = {"pipeline_busy (m x slowest stage)": busy, "pipeline_bubble": float(c["pipeline"]) - busy,
                 "dp_gradient_reduction": float(c["dp_reduce"]), "optimizer_step": float(c["optimizer"]),
                 "fixed_overhead": s.overhead_s, "zero3_parameter_gathers": float(c["zero3_gather"])}
    hw = recipe.hardware
    return Performance(
        step_time_s=step, throughput_seq_per_s=s.global_batch / step,
        throughput_tokens_per_s=s.global_batch * s.S / step,
        mfu=model_flops_per_step(s) / (step * gpus * s.peak_flops), gpus=gpus, micro_batches=m,
        bubble_fraction=(pp - 1) / (m + pp - 1), breakdown=breakdown, per_micro_batch=per_mb,
        assumptions={"peak_tflops": hw.peak_tflops, "mfu_on_matmuls": hw.mfu,
                     "hbm_bandwidth_tbps": hw.hbm_bandwidth_tbps, "bandwidth_utilization": hw.bandwidth_utilization,
                     "gpu (device class)": hw.gpu, "gemm_shape (sm_count, tile, K at half rate, kernel us)":
                         [hw.sm_count, list(hw.gemm_tile), hw.gemm_k_half, hw.kernel_launch_us],
                     "attention_efficiency (None: mfu)": hw.attention_efficiency,
                     "gpus_per_node (ASSUMED)": hw.gpus_per_node, "intra_node_gbps (ASSUMED)": hw.intra_node_gbps,
                     "inter_node_gbps (ASSUMED)": hw.inter_node_gbps, "step_overhead_ms": hw.step_overhead_ms,
                     "overlap": "none: TP/EP collectives, pipeline sends and the gradient reduction are exposed",
                     "routing_imbalance (busiest expert over mean; ep > 1, dropless)": imbalance,
                     "zero3 (DeepSpeed stage-3 settings)": dataclasses.asdict(s.zero3)},
        moe_backend=strategy.moe_backend)
