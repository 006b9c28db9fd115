# Copyright 2026 The moe-recipes authors. Licensed under the Apache License, Version 2.0 (pyproject.toml).
"""MoEForCausalLM: a single-device Hugging Face MoE decoder (no torch.distributed here).

Block: x + Attention(RMSNorm(x)), then h + MoE(RMSNorm(h)). Attention is grouped-query with RoPE through the
function transformers registers for `attn_implementation` (SDPA by default, eager, flex, flash); the MoE block is a
top-k router (see `routing.py`) over experts stored as stacked tensors `[E, ...]`. With `hidden_act="silu"` the
parameter names and shapes are transformers' Mixtral's.

Shape suffixes: B batch, S query length, K_ key length, D hidden, H heads, Hd head width, T = B*S tokens,
E experts, K top-k, R routed token copies (T*K; the loop kernel leaves the dropped ones out), I expert hidden width.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import grouped_mm_experts_forward
from transformers.processing_utils import Unpack
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration import MoEConfig
from .grouped_ffn import grouped_backend, grouped_expert_ffn
from .losses import training_loss
from .routing import capacity_keep_mask, expert_capacity, expert_counts, load_balancing_loss, route, router_z_loss


class MoERMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.scale() * x_fp32.to(x.dtype)

    def scale(self) -> torch.Tensor:
        """The weight the normalised values are multiplied by (a tensor-parallel q/k norm wraps it)."""
        return self.weight


class MoERotaryEmbedding(nn.Module):
    """RoPE tables for given positions, (cos, sin) [B, S, Hd] each, of the type `config.rope_parameters` names:
    "default" (plain RoPE, base `rope_theta`) or any of transformers' scaled types (linear, dynamic, yarn, longrope,
    llama3), whose frequencies come from its `ROPE_INIT_FUNCTIONS`.

    No buffer: the Hd/2 frequencies are computed in each forward, so a model built on the meta device (the training
    path) has nothing to fill. The parameters are copied at construction (a later edit of the config changes no built
    model), and "dynamic" scaling depends on this forward's positions only (transformers' own keeps the widest
    frequencies it has seen until a sequence is short again)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = copy.copy(config)
        self.config.rope_parameters = copy.deepcopy(config.rope_parameters)
        self.rope_type = self.config.rope_parameters["rope_type"]
        self.latest_seq_len = 0  # "dynamic": the positions its latest forward saw (a host int read once per forward)

    def frequencies(self, seq_len: int, device=None) -> tuple[torch.Tensor, float]:
        """(inverse frequencies [Hd/2] in fp32, the factor cos and sin are scaled by) for positions below `seq_len`
        (only "dynamic" depends on it)."""
        if self.rope_type == "default":  # over the rotating share of each head (partial_rotary_factor, GLM's 0.5)
            theta = self.config.rope_parameters["rope_theta"]
            dim = int(self.config.head_dim * self.config.rope_parameters.get("partial_rotary_factor", 1.0))
            return 1.0 / (theta ** (torch.arange(0, dim, 2, device=device).float() / dim)), 1.0
        init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        if self.rope_type == "dynamic":
            return init_fn(self.config, device, seq_len=max(seq_len, self.config.max_position_embeddings))
        return init_fn(self.config, device)

    @property
    def inv_freq(self) -> torch.Tensor:
        """The inverse frequencies the latest forward used (on the CPU)."""
        return self.frequencies(self.latest_seq_len)[0]

    def forward(self, x: torch.Tensor, position_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope_type == "dynamic":
            self.latest_seq_len = int(position_ids_BS.max()) + 1
        inv_freq_h, scaling = self.frequencies(self.latest_seq_len, position_ids_BS.device)
        freqs_BSh = position_ids_BS[..., None].float() * inv_freq_h.float()
        angles_BSd = torch.cat((freqs_BSh, freqs_BSh), dim=-1)
        return (angles_BSd.cos() * scaling).to(x.dtype), (angles_BSd.sin() * scaling).to(x.dtype)


def apply_rope(x_BHSd: torch.Tensor, cos_BSr: torch.Tensor, sin_BSr: torch.Tensor) -> torch.Tensor:
    """RoPE on the first r dims of each head (r = the tables' width: d, or its `partial_rotary_factor` share), by
    halves (dim i pairs with i + r/2), as transformers' rotate_half; the other d - r dims pass unchanged."""
    cos, sin = cos_BSr.unsqueeze(1), sin_BSr.unsqueeze(1)
    r = cos.shape[-1]
    x_BHSr, rest = (x_BHSd, None) if r == x_BHSd.shape[-1] else (x_BHSd[..., :r], x_BHSd[..., r:])
    rotated = torch.cat((-x_BHSr[..., r // 2:], x_BHSr[..., : r // 2]), dim=-1)
    out = x_BHSr * cos + rotated * sin
    return out if rest is None else torch.cat((out, rest), dim=-1)


def apply_rope_interleaved(x_BHSr: torch.Tensor, cos_BSr: torch.Tensor, sin_BSr: torch.Tensor) -> torch.Tensor:
    """RoPE over interleaved pairs (dim 2i pairs with 2i + 1, each pair at frequency i; DeepSeek's layout), the
    rotated pairs written out by halves (the evens' results, then the odds'), as transformers' DeepSeek-V3 does;
    the tables are `MoERotaryEmbedding`'s (their two halves repeat the frequencies)."""
    half = cos_BSr.shape[-1] // 2
    cos, sin = cos_BSr[..., :half].unsqueeze(1), sin_BSr[..., :half].unsqueeze(1)
    even, odd = x_BHSr[..., 0::2], x_BHSr[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)


def eager_attention(module: nn.Module, q_BHSd: torch.Tensor, k_BhKd: torch.Tensor, v_BhKd: torch.Tensor,
                    mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """Attention written out (softmax(q k^T * scaling + mask) v), for `attn_implementation="eager"`: the one path
    that can return the attention weights. `mask` is transformers' additive float mask [B, 1, S, K_] or None;
    h = key/value heads, repeated to H. Returns (out [B, S, H, d], weights [B, H, S, K_]) as transformers'
    attention functions do."""
    groups = q_BHSd.shape[1] // k_BhKd.shape[1]
    k_BHKd = k_BhKd.repeat_interleave(groups, dim=1)
    v_BHKd = v_BhKd.repeat_interleave(groups, dim=1)
    scores_BHSK = torch.matmul(q_BHSd, k_BHKd.transpose(2, 3)) * scaling
    if mask is not None:
        scores_BHSK = scores_BHSK + mask[..., : k_BHKd.shape[-2]]
    weights_BHSK = torch.softmax(scores_BHSK, dim=-1, dtype=torch.float32).to(q_BHSd.dtype)
    weights_BHSK = F.dropout(weights_BHSK, p=dropout, training=module.training)
    return torch.matmul(weights_BHSK, v_BHKd).transpose(1, 2).contiguous(), weights_BHSK


class MoEAttention(nn.Module):
    """Grouped-query attention over the heads this module holds: all of the config's by default; a tensor-parallel
    rank builds one with its share (`num_heads`, `num_kv_heads`) and reuses this forward.

    The attention itself is the function transformers registers for `config._attn_implementation` ("sdpa", the
    default: torch's `scaled_dot_product_attention`; "flex_attention"; "flash_attention_*" where installed), or
    `eager_attention`. Returns (output [B, S, D], attention weights or None: only the eager path has them).

    Per family (`MoEConfig`): biases on q, k, v (`attention_bias`) and o (`attention_out_bias`); q/k RMSNorm per head
    (`qk_norm="head"`) or over the whole projection ("projection"), before RoPE; `clip_qkv` after the norms."""

    is_causal = True

    def __init__(self, config: MoEConfig, layer_idx: int, num_heads: int | None = None,
                 num_kv_heads: int | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.num_heads = config.num_attention_heads if num_heads is None else num_heads
        self.num_kv_heads = config.num_key_value_heads if num_kv_heads is None else num_kv_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_out_bias)
        self.qk_norm, self.clip_qkv = config.qk_norm, config.clip_qkv
        if self.qk_norm is not None:
            per_head = self.qk_norm == "head"
            self.q_norm = MoERMSNorm(self.head_dim if per_head else self.num_heads * self.head_dim, config.rms_norm_eps)
            self.k_norm = MoERMSNorm(self.head_dim if per_head else self.num_kv_heads * self.head_dim,
                                     config.rms_norm_eps)

    def forward(self, x_BSD, cos_sin, mask=None, cache: Cache | None = None, **kwargs):
        B, S, _ = x_BSD.shape
        q_BSF, k_BSF, v_BSF = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if self.qk_norm == "projection":
            q_BSF, k_BSF = self.q_norm(q_BSF), self.k_norm(k_BSF)
        if self.clip_qkv is not None:
            q_BSF, k_BSF, v_BSF = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q_BSF, k_BSF, v_BSF))
        q_BSHd, k_BSHd = q_BSF.view(B, S, -1, self.head_dim), k_BSF.view(B, S, -1, self.head_dim)
        if self.qk_norm == "head":
            q_BSHd, k_BSHd = self.q_norm(q_BSHd), self.k_norm(k_BSHd)
        q_BHSd, k_BHSd = q_BSHd.transpose(1, 2), k_BSHd.transpose(1, 2)
        v_BHSd = v_BSF.view(B, S, -1, self.head_dim).transpose(1, 2)
        q_BHSd, k_BHSd = apply_rope(q_BHSd, *cos_sin), apply_rope(k_BHSd, *cos_sin)
        if cache is not None:
            k_BHSd, v_BHSd = cache.update(k_BHSd, v_BHSd, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        out_BSHd, weights = attend(self, q_BHSd, k_BHSd, v_BHSd, mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return self.o_proj(out_BSHd.reshape(B, S, -1)), weights


class MoEMLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3; `MoEConfig`'s MLA section), over the heads this module holds
    (all by default). Queries q [B, H, S, n + r] = W_q x, or W_qb RMSNorm(W_qa x) through `q_lora_rank`; the
    compressed [c_kv, k_rope] = W_kva x ([B, S, kv_lora_rank + r]); per head [k_nope, v] = W_kvb RMSNorm(c_kv);
    RoPE on the last r dims of q and on the one k_rope every head shares; keys [k_nope, k_rope]. A cache holds the
    compressed (c_kv after its norm, k_rope after RoPE), as transformers' DeepSeek-V3 does. Same forward contract as
    `MoEAttention` (n = qk_nope_head_dim, r = qk_rope_head_dim)."""

    is_causal = True

    def __init__(self, config: MoEConfig, layer_idx: int, num_heads: int | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads if num_heads is None else num_heads
        self.num_key_value_groups = 1  # keys and values are expanded per query head
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_rank, self.qk_dim = config.kv_lora_rank, self.nope + self.rope
        D, H, qk, bias = config.hidden_size, self.num_heads, self.qk_dim, config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = MoERMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_rank + self.rope, bias=bias)
        self.kv_a_layernorm = MoERMSNorm(self.kv_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=bias)
        self.scaling = yarn_apply_mscale(config.rope_parameters, qk**-0.5)
        self.rotate = apply_rope_interleaved if config.rope_interleave else apply_rope

    def to_heads(self, shared: torch.Tensor) -> torch.Tensor:
        """A tensor every head reads (the latents, the RoPE key) on its way to this module's heads: itself here; a
        tensor-parallel rank sums its gradient over the ranks' heads (`parallel.tensor_parallel`)."""
        return shared

    def forward(self, x_BSD, cos_sin, mask=None, cache: Cache | None = None, **kwargs):
        B, S, _ = x_BSD.shape
        if hasattr(self, "q_proj"):
            q_BSF = self.q_proj(self.to_heads(x_BSD))
        else:
            q_BSF = self.q_b_proj(self.to_heads(self.q_a_layernorm(self.q_a_proj(x_BSD))))
        q_BHSq = q_BSF.view(B, S, -1, self.qk_dim).transpose(1, 2)
        q_nope_BHSn, q_rope_BHSr = torch.split(q_BHSq, [self.nope, self.rope], dim=-1)
        ckv_BSc, k_rope_BSr = torch.split(self.kv_a_proj_with_mqa(x_BSD), [self.kv_rank, self.rope], dim=-1)
        ckv_B1Sc = self.to_heads(self.kv_a_layernorm(ckv_BSc).view(B, 1, S, self.kv_rank))
        q_rope_BHSr = self.rotate(q_rope_BHSr, *cos_sin)
        k_rope_B1Sr = self.to_heads(self.rotate(k_rope_BSr.view(B, 1, S, self.rope), *cos_sin))
        if cache is not None:
            ckv_B1Sc, k_rope_B1Sr = cache.update(ckv_B1Sc, k_rope_B1Sr, self.layer_idx)
        K = ckv_B1Sc.shape[2]  # keys: the cached positions too
        kv_BHKf = self.kv_b_proj(ckv_B1Sc).view(B, K, -1, self.nope + self.v_dim).transpose(1, 2)
        k_nope_BHKn, v_BHKv = torch.split(kv_BHKf, [self.nope, self.v_dim], dim=-1)
        k_BHKq = torch.cat((k_nope_BHKn, k_rope_B1Sr.expand(-1, k_nope_BHKn.shape[1], -1, -1)), dim=-1)
        q_BHSq = torch.cat((q_nope_BHSn, q_rope_BHSr), dim=-1)
        implementation = self.config._attn_implementation
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
        pad = self.qk_dim - self.v_dim if implementation not in (None, "eager") else 0
        if pad > 0:  # the fused kernels (flash; CPU's too) take one width for q, k and v: zeros pad v, sliced off
            v_BHKv = F.pad(v_BHKv, (0, pad))
        out_BSHv, weights = attend(self, q_BHSq, k_BHKq, v_BHKv, mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return self.o_proj(out_BSHv[..., : self.v_dim].reshape(B, S, -1)), weights


class MoERouter(nn.Linear):
    """The gate: one linear map to expert logits (no bias), `weight` [E, D] like Mixtral's `mlp.gate`. An
    `nn.Linear`, so that PEFT's LoRA (and anything else that adapts linear layers) can target it as `gate`. With
    `router_score_bias` it also holds `e_score_correction_bias` [E] (fp32, a buffer: it chooses experts and is
    moved by the balance rule, never by a gradient; GLM's and DeepSeek-V3's name and place)."""

    def __init__(self, config: MoEConfig):
        super().__init__(config.hidden_size, config.num_local_experts, bias=False)
        if config.router_score_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_local_experts, dtype=torch.float32))


class MoEMLP(nn.Module):
    """One dense FFN of width `width`: a dense layer's (`MoEConfig.dense_layers`) or the shared experts'. silu:
    down(silu(gate(x)) * up(x)), the Qwen, OLMoE and GLM MLP; gelu: down(gelu(up(x)))."""

    def __init__(self, config: MoEConfig, width: int):
        super().__init__()
        self.gated = config.hidden_act == "silu"
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act_fn(self.up_proj(x))
        return self.down_proj(h)


def expert_ffn(x_ND, w_in, w_down, act_fn, gated: bool) -> torch.Tensor:
    """One expert. gated (silu): down(act(x G^T) * (x U^T)) with w_in = [G; U]; else down(act(x U^T))."""
    if gated:
        gate_NI, up_NI = F.linear(x_ND, w_in).chunk(2, dim=-1)
        h_NI = act_fn(gate_NI) * up_NI
    else:
        h_NI = act_fn(F.linear(x_ND, w_in))
    return F.linear(h_NI, w_down)


@use_experts_implementation
class MoEExperts(nn.Module):
    """E expert FFNs as stacked tensors. gelu: `up_proj` [E, I, D]; silu: `gate_up_proj` [E, 2I, D]; `down_proj` [E, D, I].

    transformers' experts interface picks the forward by `config._experts_implementation`: "eager" (the default
    here, see `MoEPreTrainedModel.get_correct_experts_implementation`) is this class's own forward below, the one
    the training paths use; "grouped_mm" and "batched_mm" are transformers' kernels over the same tensors (dropless
    only: they take no capacity mask)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        E, D, I = config.num_local_experts, config.hidden_size, config.expert_width
        self.num_experts = E
        self.gated = config.hidden_act == "silu"
        self.act_fn = ACT2FN[config.hidden_act]
        if self.gated:
            self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        else:
            self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.hidden_act = config.hidden_act

    @property
    def has_gate(self) -> bool:
        """What transformers' expert kernels read to tell `gate_up_proj` from `up_proj`: follows `hidden_act`."""
        return self.gated

    @has_gate.setter
    def has_gate(self, value: bool) -> None:
        # `use_experts_implementation` sets one value for the whole class (True: gated); this class holds both kinds
        pass

    def forward(self, x_TD, experts_TK, weights_TK, keep_TK=None):
        """Group the routed copies of the tokens by expert (one sort), run each expert once, combine with index_add.

        The kernel is `grouped_ffn.grouped_backend`'s choice. The loop reads the counts back to the host once
        and leaves the dropped routes out; `torch._grouped_mm` keeps the counts on the device (no host sync in
        forward or backward) and carries the dropped routes as zero rows at the end, all T*K of them."""
        K, E = experts_TK.shape[1], self.num_experts
        w_in = self.gate_up_proj if self.gated else self.up_proj
        grouped = grouped_backend(x_TD, w_in, self.down_proj) == "grouped_mm"
        if not grouped and torch.compiler.is_compiling():
            # the loop reads the counts to the host, a data-dependent shape torch.compile cannot trace in one graph;
            # transformers' grouped_mm experts keep them on the device (its custom op falls back to a loop inside).
            # A dropped route is weighted 0 there: the same sum, and no gradient reaches it either way
            if keep_TK is not None:
                weights_TK = weights_TK * keep_TK
            return grouped_mm_experts_forward(self, x_TD, experts_TK, weights_TK.to(x_TD.dtype))
        expert_R = experts_TK.reshape(-1)
        dropping = keep_TK is not None
        if dropping:  # dropped routes go to a sentinel expert E that sorts last and is never run
            expert_R = expert_R.masked_fill(~keep_TK.reshape(-1), E)
        order_R = torch.argsort(expert_R, stable=True)
        counts = expert_counts(expert_R, E + 1 if dropping else E)
        if not grouped:
            counts = counts[:E].tolist()
            order_R = order_R[: sum(counts)]
        token_R = order_R // K
        x_RD = x_TD[token_R]
        y_RD = grouped_expert_ffn(x_RD, w_in, self.down_proj, counts, self.hidden_act, self.gated)
        y_RD = y_RD * weights_TK.reshape(-1)[order_R, None].to(y_RD.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_R, y_RD)


@dataclass
class RouterOutput:
    """What one MoE block's router produced in this forward: returned, never kept on the module."""

    logits_TE: torch.Tensor
    aux_loss: torch.Tensor  # routing.load_balancing_loss
    z_loss: torch.Tensor  # routing.router_z_loss, or 0 where its coefficient is 0
    expert_counts_E: torch.Tensor  # routes each expert received (before any capacity drop), int64, no grad
    experts_TK: torch.Tensor | None = None  # the chosen experts (the routes `MoEModel` masks padding out of)
    probs_TE: torch.Tensor | None = None  # what the balance loss reads (`routing.Routing.probs_TE`)


def balance_loss(config, probs_TE: torch.Tensor, experts_TK: torch.Tensor, sequences: int,
                 mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """A layer's load-balancing loss (`routing.load_balancing_loss`) over its forward's `sequences` sequences:
    per sequence where the config says `router_aux_loss_per_sequence`, else over all of them at once."""
    return load_balancing_loss(probs_TE, experts_TK, mask_T, sequences if config.router_aux_loss_per_sequence else 1)


def shared_output(block: nn.Module, x_TD: torch.Tensor) -> torch.Tensor:
    """The shared experts' output of an MoE block (any of its parallel forms) that holds `shared_experts` and, with
    `shared_expert_gate`, that gate: one FFN every token goes through, scaled per token by sigmoid(x w)."""
    shared_TD = block.shared_experts(x_TD)
    if block.config.shared_expert_gate:
        shared_TD = torch.sigmoid(block.shared_expert_gate(x_TD)) * shared_TD
    return shared_TD


class MoESparseBlock(nn.Module):
    """Router, routed experts and (`num_shared_experts`) one shared FFN every token goes through, added to the
    routed output, per token scaled by sigmoid(`shared_expert_gate`(x)) where the config has that gate."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.gate = MoERouter(config)
        self.experts = MoEExperts(config)
        if config.num_shared_experts:
            self.shared_experts = MoEMLP(config, config.shared_width)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def _score_bias(self) -> torch.Tensor | None:
        if not self.config.router_score_bias:
            return None
        return getattr(self.gate, "base_layer", self.gate).e_score_correction_bias  # PEFT's LoRA wraps the router

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        logits_TE = self.gate(x_TD)
        c = self.config
        probs_TE, weights_TK, experts_TK = route(logits_TE, self.top_k, c.router_scoring, c.norm_topk_prob,
                                                 c.routed_scaling_factor, c.n_group, c.topk_group,
                                                 self._score_bias())
        keep_TK = None
        if self.config.capacity_factor is not None:
            if self.config._experts_implementation not in (None, "eager"):
                raise ValueError(f"experts_implementation={self.config._experts_implementation!r} is dropless: "
                                 "with a capacity_factor use the model's own experts (experts_implementation='eager')")
            capacity = expert_capacity(x_TD.shape[0], self.config.num_local_experts, self.top_k,
                                       self.config.capacity_factor, self.config.min_capacity)
            keep_TK = capacity_keep_mask(experts_TK, self.config.num_local_experts, capacity)
        y_TD = self.experts(x_TD, experts_TK, weights_TK) if keep_TK is None else \
            self.experts(x_TD, experts_TK, weights_TK, keep_TK)
        if c.num_shared_experts:
            y_TD = y_TD + shared_output(self, x_TD)
        z_loss = router_z_loss(logits_TE) if self.config.router_z_loss_coef > 0 else logits_TE.new_zeros((), dtype=torch.float32)
        router = RouterOutput(logits_TE, balance_loss(c, probs_TE, experts_TK, x_BSD.shape[0]), z_loss,
                              expert_counts(experts_TK.detach(), self.config.num_local_experts), experts_TK, probs_TE)
        return y_TD.view_as(x_BSD), router


class MoEDecoderLayer(GradientCheckpointingLayer):
    """Attention, then the layer's FFN: an MoE block, or a dense FFN in the config's `dense_layers` (whose router
    output is None)."""

    def __init__(self, config: MoEConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = MoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MoEMLAttention(config, layer_idx) if config.mla else MoEAttention(config, layer_idx)
        self.post_attention_layernorm = MoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoESparseBlock(config) if config.is_moe_layer(layer_idx) else MoEMLP(config, config.intermediate_size)

    def forward(self, x_BSD, cos_sin, mask=None, cache=None, **kwargs) -> tuple[torch.Tensor, RouterOutput | None]:
        attn_BSD, _ = self.self_attn(self.input_layernorm(x_BSD), cos_sin, mask, cache, **kwargs)
        h_BSD = x_BSD + attn_BSD
        if isinstance(self.mlp, MoEMLP):
            return h_BSD + self.mlp(self.post_attention_layernorm(h_BSD)), None
        moe_BSD, router = self.mlp(self.post_attention_layernorm(h_BSD))
        return h_BSD + moe_BSD, router


class MoEPreTrainedModel(PreTrainedModel):
    config_class = MoEConfig
    config: MoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoEDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # tests/test_hf_generation.py compiles a forward with fullgraph=True
    # what `output_hidden_states`, `output_attentions` and `output_router_logits` return: transformers' forward hooks
    # record these modules' outputs (at `index` where the output is a tuple)
    _can_record_outputs = {
        "hidden_states": OutputRecorder(MoEDecoderLayer, index=0),
        "attentions": OutputRecorder(MoEAttention, index=1),
        "router_logits": OutputRecorder(MoERouter, index=0),
    }

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """No request means the model's own experts ("eager": `MoEExperts.forward`, grouped_ffn's kernels with
        their host-sync-free backward), not transformers' default ("grouped_mm", its own kernel)."""
        return super().get_correct_experts_implementation("eager" if requested_experts is None else requested_experts)

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MoEExperts):  # the router is an nn.Linear: transformers' own init draws it
            for param in module.parameters(recurse=False):
                init.normal_(param, mean=0.0, std=std)
        if isinstance(module, MoERouter) and self.config.router_score_bias:
            init.zeros_(module.e_score_correction_bias)


@dataclass
class MoEModelOutput(MoeModelOutputWithPast):
    """`aux_loss`, `z_loss`: means over the MoE layers; `expert_counts_LE`: routes per expert of every MoE layer
    [L, E] (dense layers have none)."""

    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    expert_counts_LE: torch.LongTensor | None = None


@dataclass
class MoECausalLMOutput(MoeCausalLMOutputWithPast):
    """`loss` (`losses.training_loss`) and `lm_loss` when labels are given; `expert_counts_LE` as `MoEModelOutput`'s."""

    lm_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    expert_counts_LE: torch.LongTensor | None = None


class MoEModel(MoEPreTrainedModel):
    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(MoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = MoERotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs: Unpack[TransformersKwargs]) -> MoEModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        x_BSD = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        q_len = x_BSD.shape[1]
        if position_ids is None:
            past_len = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past_len, past_len + q_len, device=x_BSD.device).unsqueeze(0)
        cos_sin = self.rotary_emb(x_BSD, position_ids)
        mask = create_causal_mask(config=self.config, inputs_embeds=x_BSD, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        routers = []
        for layer in self.layers:
            x_BSD, router = layer(x_BSD, cos_sin, mask, cache)
            if router is not None:  # a dense layer routes nothing
                routers.append(router)
        num_layers = len(routers)
        return MoEModelOutput(
            last_hidden_state=self.norm(x_BSD),
            cache=cache,
            aux_loss=sum(masked_aux_loss(r, self.config, attention_mask, q_len) for r in routers) / num_layers,
            z_loss=sum(r.z_loss for r in routers) / num_layers,
            expert_counts_LE=torch.stack([r.expert_counts_E for r in routers]),
        )


def masked_aux_loss(router: RouterOutput, config, attention_mask_BK: torch.Tensor | None, q_len: int) -> torch.Tensor:
    """A layer's load-balancing loss over the real tokens of a padded batch (a 2-D `attention_mask`, 0 = padding:
    its last q_len columns are this forward's tokens), as transformers' Mixtral counts it; the block's own figure
    where there is no such mask (training batches are packed: never padded)."""
    if attention_mask_BK is None or attention_mask_BK.dim() != 2 or router.experts_TK is None:
        return router.aux_loss
    mask_BS = attention_mask_BK[:, -q_len:]
    return balance_loss(config, router.probs_TE, router.experts_TK, mask_BS.shape[0], mask_BS.reshape(-1))


def causal_lm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor | None,
                   shift_labels_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token cross-entropy in fp32, the number of tokens it averages); label -100 is ignored.

    The labels are shifted (the last position gets -100), not the logits: a slice of the logits would make backward
    allocate and fill a zero gradient of the full logits ([T, V]) before copying the slice into it. `shift_labels_BS`
    (transformers' name): targets already shifted, used as they are.
    """
    targets_BS = shift_labels_BS if shift_labels_BS is not None else F.pad(labels_BS[:, 1:], (0, 1), value=-100)
    targets_T = targets_BS.reshape(-1).to(logits_BSV.device)
    mean = F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]), targets_T, ignore_index=-100)
    return mean, (targets_T != -100).sum()


class MoEForCausalLM(MoEPreTrainedModel, GenerationMixin):
    """The causal LM. Its `loss` is `losses.training_loss` of this forward's batch; given `num_items_in_batch` (what
    transformers' Trainer passes under gradient accumulation: the target tokens of the whole accumulated batch, the
    Trainer then leaving the loss undivided), it is that loss times this batch's share of those tokens, so the
    accumulated micro-batches sum to one batch's mean."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    accepts_loss_kwargs = True  # transformers' Trainer: pass num_items_in_batch, do not divide the loss

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.model = MoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_router_logits=None, logits_to_keep: int = 0,
                num_items_in_batch=None, shift_labels=None, **kwargs: Unpack[TransformersKwargs]) -> MoECausalLMOutput:
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, output_router_logits=output_router_logits,
                         **kwargs)
        hidden_BSD = out.last_hidden_state
        if logits_to_keep:
            hidden_BSD = hidden_BSD[:, -logits_to_keep:]
        logits_BSV = self.lm_head(hidden_BSD)
        loss = lm_loss = None
        if labels is not None or shift_labels is not None:
            lm_loss, tokens = causal_lm_loss(logits_BSV, labels, shift_labels)
            loss = training_loss(lm_loss, out.aux_loss, out.z_loss, self.config)
            if num_items_in_batch is not None:
                loss = loss * (tokens / torch.as_tensor(num_items_in_batch, device=tokens.device))
        return MoECausalLMOutput(
            loss=loss, lm_loss=lm_loss, aux_loss=out.aux_loss, z_loss=out.z_loss, logits=logits_BSV,
            cache=out.cache, hidden_states=out.hidden_states, attentions=out.attentions,
            router_logits=out.router_logits, expert_counts_LE=out.expert_counts_LE,
        )
