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
        output_router_logits: return each layer's router logits.
        initializer_range: std of the normal initialisation of every matrix.
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
        output_router_logits: bool = False,
        initializer_range: float = 0.02,
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
        self.output_router_logits = output_router_logits
        self.initializer_range = initializer_range
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
