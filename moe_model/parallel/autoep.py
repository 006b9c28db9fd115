"""DeepSpeed's AutoEP carrying the project's MoE block: the expert-parallel path with no capacity padding.

AutoEP (`deepspeed.module_inject.auto_ep*`, enabled by the `expert_parallel` section of the DeepSpeed config that
`train.ds_config` writes) replaces, inside `deepspeed.initialize`, every module whose name matches `MODULE_PATTERN`
by an `AutoEPMoELayer`: a torchtitan-style token-choice router, a variable-split all-to-all and grouped expert GEMMs
(`torch._grouped_mm`) over this rank's E/ep experts. It is the only MoE DeepSpeed accepts under ZeRO-3.

What AutoEP lacks, and the one job of `AutoEPBlock`: its layer returns the hidden states only. It computes no
load-balancing loss and no z-loss (`load_balance_coeff` is refused), and its `tokens_per_expert` buffer accumulates
over forwards (so it double-counts under recomputation). `AutoEPBlock` keeps `MoESparseBlock`'s forward contract,
`(y_BSD, RouterOutput)`, by reading the router's own logits and routes of this forward (forward hooks registered and
removed inside the forward, so no tensor outlives it) and computing the project's aux loss, z-loss and per-forward
expert counts from them with `moe_model.routing`.

Routing is the same function, as DeepSpeed's `TokenChoiceTopKRouter` computes it from the settings
`autoep_section` states: softmax or sigmoid scores in fp32; sigmoid's choice on the scores plus the score bias
(`e_score_correction_bias`, which AutoEP copies from the block's router as a buffer: the project's trainer moves it,
`routing.bias_update`, since DeepSpeed never does), limited to the `topk_group` groups whose two best scores sum
highest (DeepSpeed's `top2_sum`); top-k; the k weights renormalised (+1e-20) where `norm_topk_prob` says so, times
`routed_scaling_factor`; applied after the experts ("post"). The shared experts (and their sigmoid gate) are the
block's own modules, which AutoEP keeps and adds to its output. The fused `gate_up_proj` [E, 2I, D] is split by
AutoEP into gate (first I rows) and up, as `modeling.expert_ffn` does. Only gated (silu) experts are served: AutoEP
registers no two-matrix activation (`Strategy.backend_problem`).

Names: AutoEP's layer holds `router.gate.weight`, `router.e_score_correction_bias`, `experts.w1/w2/w3`,
`shared_experts.*` and `shared_experts_gate.weight`; `block_name` gives the block's name of each (the one home of
that mapping: checkpoints' pieces, export).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..configuration import MoEConfig
from ..modeling import MoESparseBlock, RouterOutput, balance_loss
from ..routing import expert_counts, probabilities, router_z_loss

# the block AutoEP converts: `<...>.mlp.moe` on the plain model (`model.layers.N.mlp.moe`) and in the pipeline
# (`N.layer.mlp.moe`); the `experts` and `gate` children are the project's names, the same as Mixtral's
MODULE_PATTERN = r"(.*\.)?mlp\.moe"


def autoep_section(config: MoEConfig, ep: int) -> dict[str, Any]:
    """The DeepSpeed config's `expert_parallel` section for this model on `ep` expert-parallel ranks.

    Custom patterns rather than `preset_model: mixtral`: the pipeline's module names are not Mixtral's and a
    PipelineModule has no `config` for AutoEP to read top_k and the expert count from, so everything is stated."""
    section = {
        "enabled": True,
        "autoep_size": ep,
        "moe_layer_pattern": MODULE_PATTERN,
        "router_pattern": "gate",
        "expert_pattern": "experts",
        "expert_w1": "gate_up_proj",  # fused [gate; up], split by AutoEP
        "expert_w2": "down_proj",
        "expert_w3": None,
        "expert_activation": "swiglu",  # silu(gate) * up
        "num_experts_attr": "num_local_experts",
        "top_k_attr": "num_experts_per_tok",
        "top_k": config.num_experts_per_tok,
        "score_func": config.router_scoring,
        "score_apply": "post",
        "route_norm": config.norm_topk_prob,  # False: the k probabilities as they are (OLMoE, Qwen2-MoE)
        "route_scale": 1.0,
        "routed_scaling_factor": config.routed_scaling_factor,  # (takes precedence over route_scale in DeepSpeed)
        "has_shared_experts": bool(config.num_shared_experts),
        "use_grouped_mm": True,
    }
    if config.n_group is not None and config.n_group > 1:  # group-limited top-k (n_group 1 is none, as `route` has
        # it); DeepSpeed scores a group by its two best scores, as `route` does
        section.update(num_expert_groups=config.n_group, num_limited_groups=config.topk_group)
    if config.num_shared_experts:  # the block's modules, which AutoEP keeps
        section["shared_experts_pattern"] = "shared_experts"
        if config.shared_expert_gate:
            section["shared_experts_gate_pattern"] = "shared_expert_gate"
    return section


class AutoEPBlock(nn.Module):
    """Drop-in for `MoESparseBlock` (same forward contract) whose `moe` child DeepSpeed swaps for AutoEP's layer."""

    def __init__(self, dense: MoESparseBlock):
        super().__init__()
        self.config = dense.config
        self.moe = dense  # until `deepspeed.initialize` converts it

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        layer = self.moe
        if isinstance(layer, MoESparseBlock):  # not converted: the block itself is the reference
            return layer(x_BSD)
        seen: dict[str, Any] = {}
        hooks = [layer.router.gate.register_forward_hook(lambda m, a, out: seen.__setitem__("logits_TE", out)),
                 layer.router.register_forward_hook(lambda m, a, out: seen.__setitem__("routes", out))]
        try:
            y_BSD = layer(x_BSD)
        finally:
            for hook in hooks:
                hook.remove()
        logits_TE = seen["logits_TE"]
        _, experts_TK, _ = seen["routes"]  # (weights [T, k], experts [T, k], counts [E], int32)
        cfg = self.config
        probs_TE = probabilities(logits_TE, cfg.router_scoring)
        z_loss = router_z_loss(logits_TE) if cfg.router_z_loss_coef > 0 else logits_TE.new_zeros((), dtype=torch.float32)
        router = RouterOutput(logits_TE, balance_loss(cfg, probs_TE, experts_TK, x_BSD.shape[0]), z_loss,
                              expert_counts(experts_TK.detach(), cfg.num_local_experts), experts_TK, probs_TE)
        return y_BSD, router


# AutoEP's layer -> the block: the names AutoEP gives the modules it takes from the block (its experts apart)
LAYER_TO_BLOCK = {"router.gate.weight": "gate.weight",
                  "router.e_score_correction_bias": "gate.e_score_correction_bias",
                  "shared_experts_gate.weight": "shared_expert_gate.weight"}


def block_name(part: str) -> str | None:
    """The block's name (after `.mlp.`) of a non-expert tensor of AutoEP's layer (after `.mlp.moe.`), or None where
    it is none of them (its experts `experts.w1/w2/w3`, which `block_state` and `state_dict_adapter.shard_of` fuse and
    slice)."""
    if part.startswith("shared_experts."):
        return part
    return LAYER_TO_BLOCK.get(part)


def block_state(autoep_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoEP's parameter names and layout -> `MoESparseBlock`'s, for whole experts ([E, ...], as DeepSpeed's
    universal checkpoint consolidates them): `<p>.mlp.moe.<part>` -> `<p>.mlp.<block_name(part)>` (router, score
    bias, shared experts and their gate); `<p>.mlp.moe.experts.w1` (gate) and `w3` (up), [E, I, D] each ->
    `<p>.mlp.experts.gate_up_proj` [E, 2I, D]; `w2` -> `down_proj`. Other names pass unchanged. Export, and resuming
    an AutoEP run on the legacy backend, read it."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in autoep_state.items():
        prefix, sep, part = name.partition(".mlp.moe.")
        if not sep:
            state[name] = tensor
        elif block_name(part):
            state[f"{prefix}.mlp.{block_name(part)}"] = tensor
        elif part == "experts.w1":
            state[f"{prefix}.mlp.experts.gate_up_proj"] = torch.cat([tensor, autoep_state[f"{prefix}.mlp.moe.experts.w3"]], 1)
        elif part == "experts.w2":
            state[f"{prefix}.mlp.experts.down_proj"] = tensor
        elif part != "experts.w3":
            raise KeyError(f"unknown AutoEP parameter {name}")
    return state
