"""The two Hugging Face formats the project writes (`moe export`) and reads (`train.init_from`): its own
`MoEForCausalLM` (model_type `moe_model`) and transformers' `MixtralForCausalLM` (model_type `mixtral`).

The parameters are the same set: Mixtral is this model with gated (silu) experts, no capacity and no z-loss. Two
differences are arithmetic, kept here in one place:
- Mixtral's load-balancing loss is k times this model's (it sums the top-k routing fractions), so its
  `router_aux_loss_coef` is this model's coefficient divided by k (and an imported Mixtral's, times k). One
  difference of definition stays: Mixtral pools every layer's routes into one loss (the fractions and mean
  probabilities over all layers' tokens at once), where this model averages one loss per layer; the two agree for
  one MoE layer, or wherever every layer routes alike;
- on disk transformers writes Mixtral's experts one per tensor under the Hub's names,
  `model.layers.<l>.block_sparse_moe.experts.<e>.{w1,w3,w2}.weight` (gate, up, down) and
  `...block_sparse_moe.gate.weight`, where the module holds them stacked as `mlp.experts.gate_up_proj` [E, 2I, D] (gate
  rows, then up rows) and `mlp.experts.down_proj` [E, D, I] (`hub_parts`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .configuration import MoEConfig

# the fields that fix the weights' shapes and the function they compute: a recipe must agree with its init_from folder
ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "hidden_act",
                "tie_word_embeddings", "rms_norm_eps", "rope_theta")


def mixtral_config(c: MoEConfig, dtype=None):
    """The `MixtralConfig` of this model (silu experts, dropless)."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, num_local_experts=c.num_local_experts,
        num_experts_per_tok=c.num_experts_per_tok, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        sliding_window=None, tie_word_embeddings=c.tie_word_embeddings,
        router_aux_loss_coef=c.router_aux_loss_coef / c.num_experts_per_tok,  # Mixtral's aux is k times ours
        initializer_range=c.initializer_range, torch_dtype=dtype,
    )


def model_fields(folder: Path) -> dict[str, Any]:
    """The recipe's `model` fields of a Hugging Face folder's config.json (native or Mixtral). Raises ValueError with
    the reason when the folder holds neither, or a Mixtral this model cannot compute (sliding window, other rope)."""
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json: pass a folder written by save_pretrained (or moe export)")
    raw = json.loads(path.read_text())
    kind = raw.get("model_type")
    if kind == MoEConfig.model_type:
        return {k: raw[k] for k in _MODEL_FIELDS if k in raw}
    if kind != "mixtral":
        raise ValueError(f"{folder} holds a {kind!r} model; init_from reads {MoEConfig.model_type} or mixtral folders")
    if raw.get("sliding_window") is not None:
        raise ValueError(f"{folder}: sliding_window {raw['sliding_window']} is not supported (full attention only)")
    rope = raw.get("rope_parameters") or {"rope_type": "default", "rope_theta": raw.get("rope_theta", 1e6)}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{folder}: rope_type {rope['rope_type']!r} is not supported (default rope only)")
    k = raw["num_experts_per_tok"]
    fields = {name: raw[name] for name in _MODEL_FIELDS if name in raw and name not in ("router_aux_loss_coef",)}
    fields.update(rope_theta=rope["rope_theta"], hidden_act="silu",
                  router_aux_loss_coef=raw.get("router_aux_loss_coef", 0.0) * k)
    return fields


_MODEL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "hidden_act",
                 "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps", "rope_theta",
                 "router_aux_loss_coef", "router_z_loss_coef", "capacity_factor", "min_capacity",
                 "initializer_range")


def architecture_differences(folder_fields: dict[str, Any], stated: dict[str, Any]) -> list[str]:
    """`field stated -> folder's` for every `ARCHITECTURE` field a recipe states with another value than the folder."""
    return [f"{name} {stated[name]!r} -> {folder_fields[name]!r}" for name in ARCHITECTURE
            if stated.get(name) is not None and name in folder_fields and stated[name] != folder_fields[name]]


def hub_parts(name: str, expert: int) -> list[str] | None:
    """The Hub-format Mixtral tensors that hold expert `expert` of the stacked parameter `name`, concatenated by rows
    (gate then up), or None for a name that is not a stacked expert parameter."""
    prefix, sep, part = name.partition(".mlp.experts.")
    if not sep:
        return None
    where = f"{prefix}.block_sparse_moe.experts.{expert}"
    return {"gate_up_proj": [f"{where}.w1.weight", f"{where}.w3.weight"], "down_proj": [f"{where}.w2.weight"]}[part]


def hub_name(name: str) -> str:
    """A non-expert parameter's Hub-format Mixtral name (the router moved from `mlp` to `block_sparse_moe`)."""
    return name.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")
