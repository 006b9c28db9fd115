"""The Hugging Face formats the project writes (`moe export`) and reads (`train.init_from`): its own
`MoEForCausalLM` (model_type `moe_model`) and transformers' `MixtralForCausalLM` (model_type `mixtral`); and the
other MoE families as settings of the same blocks (`FAMILIES`, at the end: Qwen3-MoE, Qwen2-MoE, OLMoE,
GLM-4.5-MoE, DeepSeek-V3), read and written through transformers' own classes for them.

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
  rows, then up rows) and `mlp.experts.down_proj` [E, D, I] (`hub_parts`; the families' Hub folders likewise, as
  `mlp.experts.<e>.{gate_proj,up_proj,down_proj}.weight`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .configuration import MoEConfig

# with the block settings (`ARCHITECTURE`, below): the fields that fix the weights' shapes and the function they
# compute, on which a recipe must agree with its init_from folder
_SHAPE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
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
    """The recipe's `model` fields of a Hugging Face folder's config.json (native, Mixtral or a `FAMILIES` model).
    Raises ValueError with the reason when the folder holds none of these, or a model this one cannot compute
    (sliding window, another rope type)."""
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json: pass a folder written by save_pretrained (or moe export)")
    raw = json.loads(path.read_text())
    kind = raw.get("model_type")
    if kind == MoEConfig.model_type:
        fields = {k: raw[k] for k in _MODEL_FIELDS + BLOCK_SETTINGS if k in raw}
        return {**fields, **_rope_fields(folder, raw.get("rope_parameters") or {"rope_theta": raw.get("rope_theta")})}
    if kind in FAMILIES:
        import transformers

        try:
            config = family_config(transformers.AutoConfig.from_pretrained(folder))
        except ValueError as err:
            raise ValueError(f"{folder}: {err}") from None
        fields = {k: getattr(config, k) for k in _MODEL_FIELDS + BLOCK_SETTINGS}
        return {**fields, **_rope_fields(folder, config.rope_parameters)}
    if kind != "mixtral":
        raise ValueError(f"{folder} holds a {kind!r} model; init_from reads {MoEConfig.model_type}, mixtral or "
                         f"{', '.join(FAMILIES)} folders")
    if raw.get("sliding_window") is not None:
        raise ValueError(f"{folder}: sliding_window {raw['sliding_window']} is not supported (full attention only)")
    rope = raw.get("rope_parameters") or {"rope_type": "default", "rope_theta": raw.get("rope_theta", 1e6)}
    k = raw["num_experts_per_tok"]
    fields = {name: raw[name] for name in _MODEL_FIELDS if name in raw and name not in ("router_aux_loss_coef",)}
    fields.update(_rope_fields(folder, rope), hidden_act="silu",
                  router_aux_loss_coef=raw.get("router_aux_loss_coef", 0.0) * k)
    return fields


def _rope_fields(folder: Path, rope: dict[str, Any]) -> dict[str, Any]:
    """A config's rope parameters as recipe fields (`rope_theta`, `partial_rotary_factor`): the recipe takes plain
    RoPE only."""
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{folder}: rope_type {rope['rope_type']!r} is not supported by recipes (default rope only)")
    fields = {"rope_theta": rope["rope_theta"]} if rope.get("rope_theta") is not None else {}
    return {**fields, "partial_rotary_factor": rope.get("partial_rotary_factor", 1.0)}


_MODEL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "hidden_act",
                 "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps", "rope_theta",
                 "router_aux_loss_coef", "router_z_loss_coef", "capacity_factor", "min_capacity",
                 "router_aux_loss_per_sequence", "router_bias_update_rate", "initializer_range")


def _block_settings() -> tuple[str, ...]:
    """The settings of the other families' blocks: MoEConfig's arguments between `initializer_range` and
    `use_cache` (its own grouping, so a new setting is named once)."""
    import inspect

    names = list(inspect.signature(MoEConfig.__init__).parameters)
    return tuple(names[names.index("initializer_range") + 1:names.index("use_cache")])


BLOCK_SETTINGS = _block_settings()


def block_settings_set(c: MoEConfig) -> list[str]:
    """`name value` for each block setting of `c` away from its default (Mixtral's block), partial rotary too."""
    import inspect

    defaults = {a.name: a.default for a in inspect.signature(MoEConfig.__init__).parameters.values()}
    changed = [f"{name} {getattr(c, name)!r}" for name in BLOCK_SETTINGS
               if getattr(c, name) != defaults[name] and not (name == "dense_layers" and not c.dense_layers)]
    partial = c.rope_parameters.get("partial_rotary_factor", 1.0)
    return changed + ([f"partial_rotary_factor {partial!r}"] if partial != 1.0 else [])
ARCHITECTURE = _SHAPE + BLOCK_SETTINGS + ("partial_rotary_factor",)


def architecture_differences(folder_fields: dict[str, Any], stated: dict[str, Any]) -> list[str]:
    """`field stated -> folder's` for every `ARCHITECTURE` field a recipe states with another value than the folder."""
    return [f"{name} {stated[name]!r} -> {folder_fields[name]!r}" for name in ARCHITECTURE
            if stated.get(name) is not None and name in folder_fields and stated[name] != folder_fields[name]]


# The Hub's one tensor per expert, per layout: (the module holding the experts, its gate, up and down tensor names).
HUB_EXPERT_LAYOUTS = (("block_sparse_moe", "w1", "w3", "w2"),  # Mixtral
                      ("mlp", "gate_proj", "up_proj", "down_proj"))  # Qwen2-MoE, Qwen3-MoE, OLMoE, GLM-4.5-MoE


def hub_parts(name: str, expert: int, layout: int = 0) -> list[str] | None:
    """The Hub tensors (of `HUB_EXPERT_LAYOUTS[layout]`) that hold expert `expert` of the stacked parameter `name`,
    concatenated by rows (gate then up), or None for a name that is not a stacked expert parameter."""
    prefix, sep, part = name.partition(".mlp.experts.")
    if not sep:
        return None
    module, gate, up, down = HUB_EXPERT_LAYOUTS[layout]
    where = f"{prefix}.{module}.experts.{expert}"
    return {"gate_up_proj": [f"{where}.{gate}.weight", f"{where}.{up}.weight"],
            "down_proj": [f"{where}.{down}.weight"]}[part]


def hub_names(name: str) -> list[str]:
    """The names a non-expert parameter may have in a Hub folder: its own; Mixtral's (the router in
    `block_sparse_moe`); each family's module renames (`Family.renames`, Qwen2-MoE's `shared_expert`)."""
    names = [name, name.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")]
    for family in FAMILIES.values():
        for theirs, ours in family.renames:
            names.append(name.replace(ours, theirs))
    return list(dict.fromkeys(names))


MTP_CONFIG_KEYS = ("num_nextn_predict_layers", "num_mtp_layers")  # the Hub's name, transformers 5's


def mtp_layers(config_json: dict[str, Any]) -> range:
    """The multi-token-prediction layers a checkpoint stores after its decoder layers (DeepSeek-V3's
    `num_nextn_predict_layers: 1` in a 61-layer model: `model.layers.61.*`, with its `enorm`, `hnorm`, `eh_proj`,
    `shared_head` and a whole decoder block): layer numbers `num_hidden_layers ..` for the count its config.json
    states, none where it states none. This model trains the main layers only: `train.init_from` leaves these out
    (one line says so) and an export's config states 0 (`_write_deepseek_v3`)."""
    count = next((config_json[key] for key in MTP_CONFIG_KEYS if config_json.get(key) is not None), 0)
    first = config_json.get("num_hidden_layers", 0)
    return range(first, first + max(int(count), 0))


def in_mtp_layer(name: str, layers: range) -> bool:
    """Whether the checkpoint tensor `name` belongs to one of the multi-token-prediction `layers` (`mtp_layers`)."""
    prefix, dot, rest = name.partition("model.layers.")
    number = rest.partition(".")[0]
    return bool(dot) and not prefix and number.isdigit() and int(number) in layers


# ------------------------------------------------------------------------------------------------ the families
# One table a family: which transformers classes hold it, which of its config fields are MoEConfig's under the same
# name (`COMMON_FIELDS`, every family) or its own (`fields`, written back verbatim), and two functions for the rest:
# `read` (its config -> MoEConfig's other arguments, or a ValueError naming a feature this model cannot compute) and
# `write` (MoEConfig -> its config's other arguments, or a ValueError naming a setting the family cannot hold).
# transformers 5.24 holds every family's experts stacked as this model does (`mlp.experts.gate_up_proj` [E, 2I, D],
# gate rows first; `mlp.experts.down_proj` [E, D, I]) and itself converts the Hub's one tensor per expert on load and
# on save, so weight names differ only where a family names a module otherwise (`renames`).

COMMON_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "num_experts_per_tok", "hidden_act", "max_position_embeddings",
                 "rms_norm_eps", "tie_word_embeddings", "initializer_range", "pad_token_id", "bos_token_id",
                 "eos_token_id")


@dataclass(frozen=True)
class Family:
    config_class: str
    model_class: str
    fields: tuple[str, ...]  # its own config fields that `write` sets verbatim (a round trip gives them back)
    read: Callable[[Any], dict[str, Any]]
    write: Callable[[MoEConfig], dict[str, Any]]
    renames: tuple[tuple[str, str], ...] = ()  # (its module path part, this model's)


def _need(ok: bool, kind: str, what: str) -> None:
    if not ok:
        raise ValueError(f"a {kind} model cannot hold this config: {what}")


def _head_dim(hf) -> int:
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def _no_sliding_window(hf) -> None:
    if getattr(hf, "use_sliding_window", False) and getattr(hf, "sliding_window", None):
        raise ValueError(f"{hf.model_type}: use_sliding_window with sliding_window {hf.sliding_window} is not "
                         "supported (this model attends to the whole sequence)")


def _qwen_dense_layers(hf) -> list[int]:
    """Qwen's rule: a layer is dense when `mlp_only_layers` lists it or it is off `decoder_sparse_step`'s beat."""
    return [i for i in range(hf.num_hidden_layers) if i in (hf.mlp_only_layers or []) or hf.num_experts <= 0
            or (i + 1) % hf.decoder_sparse_step != 0]


def _their_aux(c: MoEConfig) -> float:
    return c.router_aux_loss_coef / c.num_experts_per_tok  # their balance loss is k times this model's (Mixtral's)


def _read_qwen3(hf) -> dict[str, Any]:
    _no_sliding_window(hf)
    return dict(head_dim=_head_dim(hf), num_local_experts=hf.num_experts, moe_intermediate_size=hf.moe_intermediate_size,
                dense_layers=_qwen_dense_layers(hf), norm_topk_prob=hf.norm_topk_prob, qk_norm="head",
                attention_bias=hf.attention_bias, attention_out_bias=hf.attention_bias,
                router_aux_loss_coef=hf.router_aux_loss_coef * hf.num_experts_per_tok)


def _write_qwen3(c: MoEConfig) -> dict[str, Any]:
    _need(c.qk_norm == "head", "qwen3_moe", f"qk_norm {c.qk_norm!r} (it normalises q and k per head)")
    _need(c.attention_bias == c.attention_out_bias, "qwen3_moe", "one attention_bias covers q, k, v and o")
    _need(not c.num_shared_experts and c.router_scoring == "softmax", "qwen3_moe",
          "no shared expert, softmax routing")
    return dict(head_dim=c.head_dim, num_experts=c.num_local_experts, moe_intermediate_size=c.expert_width,
                mlp_only_layers=list(c.dense_layers), decoder_sparse_step=1, norm_topk_prob=c.norm_topk_prob,
                attention_bias=c.attention_bias, router_aux_loss_coef=_their_aux(c))


def _read_qwen2(hf) -> dict[str, Any]:
    _no_sliding_window(hf)
    shared = hf.shared_expert_intermediate_size
    return dict(head_dim=_head_dim(hf), num_local_experts=hf.num_experts, moe_intermediate_size=hf.moe_intermediate_size,
                dense_layers=_qwen_dense_layers(hf), norm_topk_prob=hf.norm_topk_prob, num_shared_experts=int(shared > 0),
                shared_expert_intermediate_size=shared or None, shared_expert_gate=shared > 0,
                attention_bias=hf.qkv_bias, router_aux_loss_coef=hf.router_aux_loss_coef * hf.num_experts_per_tok)


def _write_qwen2(c: MoEConfig) -> dict[str, Any]:
    _need(c.qk_norm is None and not c.attention_out_bias, "qwen2_moe", "no q/k norm, no bias on o_proj")
    _need(c.num_shared_experts == 1 and c.shared_expert_gate and c.router_scoring == "softmax", "qwen2_moe",
          "one shared expert behind its sigmoid gate, softmax routing")
    _need(c.head_dim == c.hidden_size // c.num_attention_heads, "qwen2_moe", "head_dim = hidden_size / heads")
    return dict(num_experts=c.num_local_experts, moe_intermediate_size=c.expert_width,
                shared_expert_intermediate_size=c.shared_width, mlp_only_layers=list(c.dense_layers),
                decoder_sparse_step=1, norm_topk_prob=c.norm_topk_prob, qkv_bias=c.attention_bias,
                router_aux_loss_coef=_their_aux(c))


def _read_olmoe(hf) -> dict[str, Any]:
    return dict(num_local_experts=hf.num_experts, norm_topk_prob=hf.norm_topk_prob, qk_norm="projection",
                clip_qkv=hf.clip_qkv, attention_bias=hf.attention_bias, attention_out_bias=hf.attention_bias,
                router_aux_loss_coef=hf.router_aux_loss_coef * hf.num_experts_per_tok)


def _write_olmoe(c: MoEConfig) -> dict[str, Any]:
    _need(c.qk_norm == "projection" and c.attention_bias == c.attention_out_bias, "olmoe",
          "q/k norm over the projection, one attention_bias for q, k, v and o")
    _need(not c.dense_layers and not c.num_shared_experts and c.router_scoring == "softmax"
          and c.expert_width == c.intermediate_size, "olmoe",
          "every layer MoE, no shared expert, softmax routing, one FFN width")
    _need(c.head_dim == c.hidden_size // c.num_attention_heads, "olmoe", "head_dim = hidden_size / heads")
    return dict(num_experts=c.num_local_experts, norm_topk_prob=c.norm_topk_prob, clip_qkv=c.clip_qkv,
                attention_bias=c.attention_bias, router_aux_loss_coef=_their_aux(c))


def _read_sigmoid_block(hf) -> dict[str, Any]:
    """GLM-4.5's and DeepSeek-V3's routed block: sigmoid scores with a score bias, group-limited top-k, a routed
    scale, shared experts of the routed width, the first k layers dense; their loss is the cross-entropy alone."""
    return dict(num_local_experts=hf.n_routed_experts, moe_intermediate_size=hf.moe_intermediate_size,
                dense_layers=list(range(hf.first_k_dense_replace)), num_shared_experts=hf.n_shared_experts,
                router_scoring="sigmoid", router_score_bias=True, n_group=hf.n_group, topk_group=hf.topk_group,
                routed_scaling_factor=hf.routed_scaling_factor, norm_topk_prob=hf.norm_topk_prob,
                attention_bias=hf.attention_bias, router_aux_loss_coef=0.0)


def _write_sigmoid_block(c: MoEConfig, kind: str) -> dict[str, Any]:
    """`_read_sigmoid_block`'s way back for family `kind` (ValueError: a block it cannot hold)."""
    k = len(c.dense_layers)
    _need(c.dense_layers == list(range(k)), kind, f"dense layers first (first_k_dense_replace), not {c.dense_layers}")
    _need(c.router_scoring == "sigmoid" and c.router_score_bias, kind, "sigmoid routing with a score bias")
    _need(not c.shared_expert_gate and c.shared_width == c.num_shared_experts * c.expert_width, kind,
          "shared experts of the routed width, no gate")
    return dict(n_routed_experts=c.num_local_experts, moe_intermediate_size=c.expert_width,
                n_shared_experts=c.num_shared_experts, n_group=c.n_group, topk_group=c.topk_group,
                routed_scaling_factor=c.routed_scaling_factor, norm_topk_prob=c.norm_topk_prob,
                first_k_dense_replace=k, attention_bias=c.attention_bias)


def _read_glm4(hf) -> dict[str, Any]:
    return dict(_read_sigmoid_block(hf), head_dim=_head_dim(hf), qk_norm="head" if hf.use_qk_norm else None)


def _write_glm4(c: MoEConfig) -> dict[str, Any]:
    block = _write_sigmoid_block(c, "glm4_moe")
    _need(c.qk_norm in (None, "head") and not c.attention_out_bias, "glm4_moe", "q/k norm per head, no o_proj bias")
    return dict(block, head_dim=c.head_dim, use_qk_norm=c.qk_norm == "head")


MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_interleave")


def _read_deepseek_v3(hf) -> dict[str, Any]:
    """DeepSeek-V3 (and Kimi-K2, Moonlight): GLM-4.5's routed block under multi-head latent attention.
    transformers' class holds no multi-token-prediction layers (`num_mtp_layers` configures generation only)."""
    return dict(_read_sigmoid_block(hf), **{name: getattr(hf, name) for name in MLA_FIELDS})


def _write_deepseek_v3(c: MoEConfig) -> dict[str, Any]:
    _need(c.mla, "deepseek_v3", "multi-head latent attention (kv_lora_rank and its widths)")
    block = _write_sigmoid_block(c, "deepseek_v3")
    _need(c.num_shared_experts > 0, "deepseek_v3", "shared experts of the routed width, no gate")
    return dict(block, n_group=c.n_group or 1, topk_group=c.topk_group or 1, num_mtp_layers=0,
                **{name: getattr(c, name) for name in MLA_FIELDS})


FAMILIES: dict[str, Family] = {
    "qwen3_moe": Family("Qwen3MoeConfig", "Qwen3MoeForCausalLM", (
        "head_dim", "num_experts", "moe_intermediate_size", "norm_topk_prob", "attention_bias"), _read_qwen3,
        _write_qwen3),
    "qwen2_moe": Family("Qwen2MoeConfig", "Qwen2MoeForCausalLM", (
        "num_experts", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob", "qkv_bias"),
        _read_qwen2, _write_qwen2, renames=(("mlp.shared_expert.", "mlp.shared_experts."),)),
    "olmoe": Family("OlmoeConfig", "OlmoeForCausalLM", (
        "num_experts", "norm_topk_prob", "clip_qkv", "attention_bias"), _read_olmoe, _write_olmoe),
    "glm4_moe": Family("Glm4MoeConfig", "Glm4MoeForCausalLM", (
        "head_dim", "n_routed_experts", "moe_intermediate_size", "n_shared_experts", "n_group", "topk_group",
        "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace", "use_qk_norm", "attention_bias"),
        _read_glm4, _write_glm4),
    "deepseek_v3": Family("DeepseekV3Config", "DeepseekV3ForCausalLM", (
        "n_routed_experts", "moe_intermediate_size", "n_shared_experts", "n_group", "topk_group",
        "routed_scaling_factor", "norm_topk_prob", "first_k_dense_replace", "attention_bias", "num_mtp_layers",
        *MLA_FIELDS), _read_deepseek_v3, _write_deepseek_v3),
}
FAMILY_FIELDS = {kind: COMMON_FIELDS + family.fields for kind, family in FAMILIES.items()}
EXPORT_FORMATS = ("native", "mixtral", *FAMILIES, "hub")  # `moe export --format` (hub: the init_from folder's)


def family_config(hf) -> MoEConfig:
    """This model's config for transformers' config `hf` of a family in `FAMILIES`. Raises ValueError naming what
    the family uses and this model cannot compute (a sliding window)."""
    family = FAMILIES.get(hf.model_type)
    if family is None:
        raise ValueError(f"model_type {hf.model_type!r} is not a family this model reads ({', '.join(FAMILIES)})")
    fields = {name: getattr(hf, name) for name in COMMON_FIELDS if hasattr(hf, name)}
    return MoEConfig(**fields, rope_parameters=dict(hf.rope_parameters), **family.read(hf))


def family_weights_config(kind: str, c: MoEConfig):
    """transformers' config of family `kind` for this model's config `c` (ValueError: a setting it cannot hold)."""
    import transformers

    family = FAMILIES[kind]
    rope = {"partial_rotary_factor": 1.0, **c.rope_parameters}  # explicit: GLM's config would default it to 0.5
    if rope["partial_rotary_factor"] == 1.0 and kind != "glm4_moe":
        rope.pop("partial_rotary_factor")
    _need(rope.get("partial_rotary_factor", 1.0) == 1.0 or kind == "glm4_moe", kind, "partial rotary is GLM's")
    _need(c.clip_qkv is None or kind == "olmoe", kind, "clip_qkv is OLMoE's")
    _need(c.capacity_factor is None and c.router_z_loss_coef == 0, kind, "dropless routing without a z-loss")
    fields = {name: getattr(c, name) for name in COMMON_FIELDS}
    return getattr(transformers, family.config_class)(**fields, rope_parameters=rope, **family.write(c))


def _renamed(state: dict[str, Any], pairs) -> dict[str, Any]:
    out = {}
    for name, tensor in state.items():
        for old, new in pairs:
            name = name.replace(old, new)
        out[name] = tensor
    return out


def from_family_names(kind: str, state: dict[str, Any]) -> dict[str, Any]:
    """A family model's state dict (transformers' module names) under this model's names."""
    return _renamed(state, FAMILIES[kind].renames)


def to_family(c: MoEConfig, state: dict[str, Any], kind: str):
    """(transformers' config, state dict under its module names) of family `kind` for this model."""
    return family_weights_config(kind, c), _renamed(state, [(new, old) for old, new in FAMILIES[kind].renames])


def load_family(folder: Path):
    """`MoEForCausalLM` holding a family's Hugging Face folder (any `FAMILIES` model_type): read through
    transformers' own class (which joins the Hub's one tensor per expert), renamed, loaded."""
    import transformers

    from .modeling import MoEForCausalLM

    hf_config = transformers.AutoConfig.from_pretrained(folder)
    config = family_config(hf_config)
    source = getattr(transformers, FAMILIES[hf_config.model_type].model_class).from_pretrained(folder)
    model = MoEForCausalLM(config)
    model.load_state_dict(from_family_names(hf_config.model_type, source.state_dict()), strict=True)
    return model.eval()


def save_family(model, folder: Path, kind: str) -> None:
    """Write `model` (an `MoEForCausalLM`) as family `kind`'s Hugging Face folder through transformers' own class
    (its save writes the Hub layout)."""
    import transformers

    config, state = to_family(model.config, model.state_dict(), kind)
    target = getattr(transformers, FAMILIES[kind].model_class)(config)
    target.load_state_dict(state, strict=True)
    target.save_pretrained(folder)
