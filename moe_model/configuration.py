# Copyright 2026 The moe-recipes authors. Licensed under the Apache License, Version 2.0 (pyproject.toml).
"""MoEConfig: the typed shape of a Mixture-of-Experts decoder.

Field names follow transformers' Mixtral wherever the concept is shared, so that a `silu` model is a Mixtral model
parameter for parameter. Validation lives here: a config that cannot build a model is refused at construction.
"""

from __future__ import annotations

import copy

from transformers import PretrainedConfig

SUPPORTED_ACTIVATIONS = ("gelu", "silu")


class MoEConfig(PretrainedConfig):
    r"""
    Args:
        vocab_size: tokens in the vocabulary.
        hidden_size: model width D.
        intermediate_size: hidden width I of one expert's FFN.
        num_hidden_layers: decoder layers L; every layer is attention + an MoE block.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (grouped-query attention); defaults to `num_attention_heads`.
        head_dim: width of one head; defaults to `hidden_size // num_attention_heads`.
        num_local_experts: experts per layer E.
        num_experts_per_tok: experts each token is routed to (top-k).
        hidden_act: `gelu` = two-matrix expert FFN (up, down); `silu` = gated FFN (gate_up, down), exactly Mixtral's.
        max_position_embeddings: longest sequence the RoPE tables are meant for.
        rms_norm_eps: epsilon of RMSNorm.
        rope_theta: RoPE base.
        rope_parameters: transformers' RoPE dict (`rope_type` "default", "linear", "dynamic", "yarn", "longrope",
            "llama3" and that type's fields); its `rope_theta` wins over the argument. Default: plain RoPE.
        tie_word_embeddings: share the input embedding with the LM head.
        router_aux_loss_coef: weight of the load-balancing loss in the training loss (see `routing.py`).
        router_z_loss_coef: weight of the router z-loss (0 disables it).
        capacity_factor: null = dropless routing; a number caps each expert at
            `max(ceil(k * capacity_factor * T / E), min_capacity)` routed tokens and drops the rest.
        min_capacity: the floor of the capacity above (DeepSpeed's default is 4).
        router_aux_loss_per_sequence: the load-balancing loss over each sequence, averaged over the sequences
            (DeepSeek-V3's sequence-wise balance loss), instead of over the whole micro-batch.
        router_bias_update_rate: aux-loss-free balancing (`router_score_bias` only): after every optimizer step the
            trainer moves each expert's score bias by this rate towards the mean load (`routing.bias_update`;
            DeepSeek-V3 used 0.001). 0: the bias stays as it is (loaded or zero).
        output_router_logits: return each layer's router logits.
        initializer_range: std of the normal initialisation of every matrix.

    The settings below make the block of the other MoE families (Qwen3-MoE, Qwen2-MoE, OLMoE, GLM-4.5-MoE:
    `formats.FAMILIES`); each default is Mixtral's block, so a config that leaves them out is exactly what it was.

        moe_intermediate_size: width of one routed expert's FFN; None: `intermediate_size`, which is then the width
            of the dense FFN layers (`dense_layers`) only.
        dense_layers: the layers whose FFN is one dense FFN of width `intermediate_size` instead of an MoE block.
        num_shared_experts: experts every token goes through beside its routed ones (one FFN of width
            `shared_expert_intermediate_size`, added to the routed output).
        shared_expert_intermediate_size: the shared FFN's width; None: `num_shared_experts` x the routed width.
        shared_expert_gate: scale the shared FFN's output per token by sigmoid(x w), w [1, D] (Qwen2-MoE).
        router_scoring: "softmax" over the experts (Mixtral, Qwen, OLMoE) or "sigmoid" per expert (GLM, DeepSeek-V3).
        norm_topk_prob: renormalise the k chosen weights to sum to 1 (sigmoid: plus 1e-20).
        routed_scaling_factor: the routed experts' weights are multiplied by it (after any renormalisation).
        n_group, topk_group: group-limited top-k: the experts in `n_group` groups, a token's experts chosen from the
            `topk_group` groups whose two best scores sum highest (sigmoid scoring only). None (no groups), not 1:
            DeepSpeed's AutoEP reads these names from the model's config and routes by groups wherever they are set.
        router_score_bias: a per-expert bias `mlp.gate.e_score_correction_bias` [E] (fp32, not a parameter) added to
            the sigmoid scores to choose the experts, never to weight them.
        qk_norm: None; "head": RMSNorm over each head of q and k (Qwen3, GLM); "projection": over the whole q and k
            projections (OLMoE). Before RoPE either way.
        attention_bias: biases on the q, k and v projections; attention_out_bias: on the output projection.
        clip_qkv: clamp q, k and v to [-clip_qkv, clip_qkv] after the projections and norms (OLMoE).
        Partial rotary (GLM): `rope_parameters["partial_rotary_factor"]`, the share of each head that rotates.

    Multi-head latent attention (MLA: DeepSeek-V2/V3, Kimi-K2, Moonlight; transformers' DeepseekV3Config names), on
    where `kv_lora_rank` is set (`mla`):

        q_lora_rank: None: q = x W_q; else q = W_qb RMSNorm(W_qa x) through this rank.
        kv_lora_rank: the rank of the compressed keys and values: [c_kv, k_rope] = W_kva x, then
            [k_nope, v] = W_kvb RMSNorm(c_kv) per head.
        qk_nope_head_dim, qk_rope_head_dim: a query/key head is qk_nope_head_dim dims without RoPE, then
            qk_rope_head_dim with it (the key's RoPE part one vector shared by every head); `head_dim` (the RoPE
            tables' width) is qk_rope_head_dim.
        v_head_dim: a value head's width.
        rope_interleave: RoPE over interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek's layout), else by halves.
        The softmax scale is (qk_nope_head_dim + qk_rope_head_dim)^-0.5, times YaRN's mscale where the rope
        parameters are YaRN's with an `mscale_all_dim` (transformers' `yarn_apply_mscale`). `attention_bias` puts
        biases on q_a/kv_a and o (q_b, kv_b and a plain q have none), as transformers does.
    """

    model_type = "moe_model"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        intermediate_size: int = 2048,
        num_hidden_layers: int = 16,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        num_local_experts: int = 64,
        num_experts_per_tok: int = 2,
        hidden_act: str = "gelu",
        max_position_embeddings: int = 10240,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        rope_parameters: dict | None = None,
        tie_word_embeddings: bool = False,
        router_aux_loss_coef: float = 0.01,
        router_z_loss_coef: float = 0.0,
        capacity_factor: float | None = None,
        min_capacity: int = 4,
        router_aux_loss_per_sequence: bool = False,
        router_bias_update_rate: float = 0.0,
        output_router_logits: bool = False,
        initializer_range: float = 0.02,
        moe_intermediate_size: int | None = None,
        dense_layers: list[int] | None = None,
        num_shared_experts: int = 0,
        shared_expert_intermediate_size: int | None = None,
        shared_expert_gate: bool = False,
        router_scoring: str = "softmax",
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        n_group: int | None = None,
        topk_group: int | None = None,
        router_score_bias: bool = False,
        qk_norm: str | None = None,
        attention_bias: bool = False,
        attention_out_bias: bool = False,
        clip_qkv: float | None = None,
        q_lora_rank: int | None = None,
        kv_lora_rank: int | None = None,
        qk_nope_head_dim: int | None = None,
        qk_rope_head_dim: int | None = None,
        v_head_dim: int | None = None,
        rope_interleave: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.num_local_experts = num_local_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_parameters = copy.deepcopy(rope_parameters)
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity
        self.router_aux_loss_per_sequence = router_aux_loss_per_sequence
        self.router_bias_update_rate = router_bias_update_rate
        self.output_router_logits = output_router_logits
        self.initializer_range = initializer_range
        self.moe_intermediate_size = moe_intermediate_size
        self.dense_layers = sorted(set(dense_layers or []))
        self.num_shared_experts = num_shared_experts
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.shared_expert_gate = shared_expert_gate
        self.router_scoring = router_scoring
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.n_group = n_group
        self.topk_group = topk_group
        self.router_score_bias = router_score_bias
        self.qk_norm = qk_norm
        self.attention_bias = attention_bias
        self.attention_out_bias = attention_out_bias
        self.clip_qkv = clip_qkv
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.rope_interleave = rope_interleave
        if kv_lora_rank is not None and head_dim is None:  # MLA: the RoPE tables span the rotating part of a head
            self.head_dim = qk_rope_head_dim
        self.use_cache = use_cache
        self._validate_shape()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # transformers' PretrainedConfig has filled rope_parameters (type "default", rope_theta from the argument)
        self.rope_theta = self.rope_parameters["rope_theta"]

    @property
    def expert_width(self) -> int:
        """I of one routed expert's FFN."""
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def shared_width(self) -> int:
        """The shared experts' one FFN's width (0: none)."""
        if not self.num_shared_experts:
            return 0
        return self.shared_expert_intermediate_size or self.num_shared_experts * self.expert_width

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (the docstring's last section) instead of grouped-query attention."""
        return self.kv_lora_rank is not None

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def _validate_shape(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                     "max_position_embeddings"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(self.hidden_act in SUPPORTED_ACTIVATIONS,
             f"hidden_act must be one of {', '.join(SUPPORTED_ACTIVATIONS)}, got {self.hidden_act!r}")
        need(self.num_experts_per_tok <= self.num_local_experts,
             f"num_experts_per_tok ({self.num_experts_per_tok}) must not exceed num_local_experts "
             f"({self.num_local_experts})")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
             f"({self.num_key_value_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        need(self.capacity_factor is None or self.capacity_factor > 0,
             f"capacity_factor must be null (no dropping) or > 0, got {self.capacity_factor!r}")
        need(self.router_aux_loss_coef >= 0 and self.router_z_loss_coef >= 0,
             "router_aux_loss_coef and router_z_loss_coef must be >= 0")
        need(self.moe_intermediate_size is None or (isinstance(self.moe_intermediate_size, int)
                                                    and self.moe_intermediate_size > 0),
             f"moe_intermediate_size must be null or a positive integer, got {self.moe_intermediate_size!r}")
        need(all(isinstance(i, int) and 0 <= i < self.num_hidden_layers for i in self.dense_layers),
             f"dense_layers must name layers 0..{self.num_hidden_layers - 1}, got {self.dense_layers}")
        need(len(self.dense_layers) < self.num_hidden_layers, "dense_layers leaves no MoE layer; keep at least one")
        need(isinstance(self.num_shared_experts, int) and self.num_shared_experts >= 0,
             f"num_shared_experts must be an integer >= 0, got {self.num_shared_experts!r}")
        need(not self.shared_expert_gate or self.num_shared_experts > 0,
             "shared_expert_gate needs a shared expert (num_shared_experts >= 1)")
        need(self.router_scoring in ("softmax", "sigmoid"),
             f"router_scoring must be softmax or sigmoid, got {self.router_scoring!r}")
        need(self.routed_scaling_factor > 0, f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        groups, kept = self.n_group or 1, self.topk_group or 1
        need(groups >= 1 and self.num_local_experts % groups == 0,
             f"n_group ({self.n_group}) must divide num_local_experts ({self.num_local_experts})")
        need(1 <= kept <= groups, f"topk_group must be in 1..n_group, got {self.topk_group}")
        need(groups == 1 or (self.router_scoring == "sigmoid" and self.num_local_experts // groups >= 2),
             "group-limited top-k (n_group > 1) needs router_scoring sigmoid and at least 2 experts a group")
        need(groups == 1 or kept * self.num_local_experts // groups >= self.num_experts_per_tok,
             f"topk_group ({self.topk_group}) groups of {self.num_local_experts // groups} experts cannot "
             f"hold the {self.num_experts_per_tok} chosen")
        need(not self.router_score_bias or self.router_scoring == "sigmoid",
             "router_score_bias goes with router_scoring sigmoid")
        need(self.router_bias_update_rate >= 0, f"router_bias_update_rate must be >= 0, got {self.router_bias_update_rate}")
        need(self.router_bias_update_rate == 0 or self.router_score_bias,
             "router_bias_update_rate moves the score bias: set router_score_bias true (with router_scoring sigmoid)")
        need(self.qk_norm in (None, "head", "projection"), f"qk_norm must be null, head or projection, got {self.qk_norm!r}")
        need(self.clip_qkv is None or self.clip_qkv > 0, f"clip_qkv must be null or > 0, got {self.clip_qkv!r}")
        if self.kv_lora_rank is not None:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                value = getattr(self, name)
                need(isinstance(value, int) and value > 0, f"MLA (kv_lora_rank set) needs {name} a positive integer, "
                                                           f"got {value!r}")
            need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
                 f"q_lora_rank must be null or a positive integer, got {self.q_lora_rank!r}")
            need(self.head_dim == self.qk_rope_head_dim, f"with MLA head_dim is the RoPE part, qk_rope_head_dim "
                                                         f"({self.qk_rope_head_dim}); got {self.head_dim}")
            need(self.num_key_value_heads == self.num_attention_heads,
                 "MLA expands keys and values per query head: num_key_value_heads must equal num_attention_heads")
            need(self.qk_norm is None and self.clip_qkv is None and not self.attention_out_bias,
                 "MLA has its own norms on the compressed q and kv: qk_norm, clip_qkv and attention_out_bias must be "
                 "off (attention_bias covers q_a, kv_a and o)")
            need("partial_rotary_factor" not in (self.rope_parameters or {}),
                 "MLA rotates qk_rope_head_dim of each head: leave partial_rotary_factor out")
        else:
            for name in ("q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                need(getattr(self, name) is None, f"{name} is MLA's: set kv_lora_rank too (or leave {name} out)")
