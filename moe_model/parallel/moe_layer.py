"""DeepSpeed's `deepspeed.moe.layer.MoE` carrying the project's experts and router (used where ep > 1).

DeepSpeed keeps its machinery: expert-parallel groups, the all-to-all dispatch and combine, expert parameter groups
(`param.allreduce = False`, `group_name`) and its per-expert checkpoint layout
(`deepspeed_moe.experts.deepspeed_experts.<local id>.*`). Two parts are the project's, so that the layer computes
exactly what `MoESparseBlock` computes on the same weights and tokens:

- `ExpertFFN`: one expert with the model's FFN (gelu two-matrix or silu gated), one copy per local expert;
- `ProjectGate`: DeepSpeed's native top-2 gate samples the second expert with Gumbel noise, drops tokens by default
  and takes its aux loss from the top-1 mask only. This gate routes with `routing.route` (fp32 softmax, top-k,
  renormalised), computes `routing.load_balancing_loss` and the z-loss, and hands DeepSpeed's MOELayer the sparse
  routes it dispatches (expert index or -1 for a dropped route, slot in the expert's buffer, gate weight).

DeepSpeed's gate interface returns a fixed tuple whose first element, the aux loss, MOELayer passes through
untouched (`MoE.forward` returns it as its second output). `ProjectGate` puts the whole `RouterOutput` (aux loss,
z-loss, logits, expert counts) in that slot, so the block returns it from the forward: no attribute of ours outlives
a forward.
"""

from __future__ import annotations

import math

import deepspeed.moe.mappings as ds_mappings
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size
from torch import nn
from transformers.activations import ACT2FN

from ..configuration import MoEConfig
from ..modeling import MoESparseBlock, RouterOutput, balance_loss, expert_ffn, shared_output
from .tensor_parallel import mark_tensor_parallel
from ..routing import expert_capacity, expert_counts, expert_positions, load_balancing_loss, route, router_z_loss


class ExpertFFN(nn.Module):
    """One expert. Parameter names are the stacked model's without the leading expert dimension."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        D, I = config.hidden_size, config.expert_width
        self.gated = config.hidden_act == "silu"
        if self.gated:
            self.gate_up_proj = nn.Parameter(torch.empty(2 * I, D))
        else:
            self.up_proj = nn.Parameter(torch.empty(I, D))
        self.down_proj = nn.Parameter(torch.empty(D, I))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x_GCD: torch.Tensor) -> torch.Tensor:
        w_in = self.gate_up_proj if self.gated else self.up_proj
        return expert_ffn(x_GCD, w_in, self.down_proj, self.act_fn, self.gated)


class ProjectGate(TopKGate):
    """The project's router behind DeepSpeed's gate interface (sparse routes, see module docstring)."""

    def __init__(self, config: MoEConfig):
        super().__init__(config.hidden_size, config.num_local_experts, k=config.num_experts_per_tok,
                         capacity_factor=config.capacity_factor or 1.0, min_capacity=config.min_capacity,
                         noisy_gate_policy=None, drop_tokens=config.capacity_factor is not None, use_rts=False,
                         top2_2nd_expert_sampling=False)
        self.config = config
        if config.router_score_bias:  # `MoERouter`'s buffer, under the gate DeepSpeed's layer calls
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_local_experts, dtype=torch.float32))

    def forward(self, x_TD, used_token=None, sparse_routes=True, use_tutel=False):
        if not sparse_routes or use_tutel:
            raise NotImplementedError("ProjectGate serves DeepSpeed's sparse-route dispatch only")
        cfg, E = self.config, self.config.num_local_experts
        logits_TE = F.linear(x_TD, self.wg.weight)
        probs_TE, weights_TK, experts_TK = route(logits_TE, cfg.num_experts_per_tok, cfg.router_scoring,
                                                 cfg.norm_topk_prob, cfg.routed_scaling_factor, cfg.n_group,
                                                 cfg.topk_group, getattr(self, "e_score_correction_bias", None))
        position_TK = expert_positions(experts_TK, E)
        counts_E = expert_counts(experts_TK, E)
        if cfg.capacity_factor is None:  # dropless: every expert's buffer is as deep as the busiest one, group-wide
            capacity_t = counts_E.max().reshape(1)
            if self.ep_group is not None and dist.get_world_size(group=self.ep_group) > 1:
                dist.all_reduce(capacity_t, op=dist.ReduceOp.MAX, group=self.ep_group)
            capacity = int(capacity_t.item())
        else:
            capacity = expert_capacity(x_TD.shape[0], E, cfg.num_experts_per_tok, cfg.capacity_factor,
                                       cfg.min_capacity)
        keep_TK = position_TK < capacity
        # with tp > 1 DeepSpeed splits each expert's buffer over the tp ranks: its depth must divide evenly
        tp = bwc_tensor_model_parallel_world_size(groups.mpu)
        buffer_depth = max(math.ceil(capacity / tp) * tp, tp)
        z_loss = router_z_loss(logits_TE) if cfg.router_z_loss_coef > 0 else logits_TE.new_zeros((), dtype=torch.float32)
        aux_loss = load_balancing_loss(probs_TE, experts_TK)  # per sequence: `DeepSpeedMoEBlock.forward`
        router = RouterOutput(logits_TE, aux_loss, z_loss, counts_E, experts_TK, probs_TE)
        indices_KT = torch.where(keep_TK, experts_TK, -1).t().to(torch.int32).contiguous()
        locations_KT = (position_TK * keep_TK).t().to(torch.int32).contiguous()
        gates_KT = weights_TK.t().contiguous()
        # the aux-loss slot carries the whole RouterOutput (module docstring): MOELayer only passes it on
        return router, buffer_depth, E, indices_KT, locations_KT, gates_KT, counts_E


class DeepSpeedMoEBlock(nn.Module):
    """Drop-in for `MoESparseBlock` (same forward contract) holding this rank's E/ep experts; the block's shared
    experts and their gate (`MoEConfig.num_shared_experts`), which every token goes through, stay beside DeepSpeed's
    layer under the block's own names, replicated like attention."""

    def __init__(self, dense: MoESparseBlock, ep: int, ep_rank: int, tp: int = 1):
        super().__init__()
        config = dense.config
        E = config.num_local_experts
        self.config = config
        self.num_local = E // ep
        self.first_expert = ep_rank * self.num_local
        self.moe = MoE(hidden_size=config.hidden_size, expert=ExpertFFN(config), num_experts=E, ep_size=ep,
                       k=config.num_experts_per_tok, capacity_factor=config.capacity_factor or 1.0,
                       min_capacity=config.min_capacity, noisy_gate_policy=None,
                       drop_tokens=config.capacity_factor is not None, use_rts=False,
                       top2_2nd_expert_sampling=False)
        gate = ProjectGate(config)
        gate.wg.weight = nn.Parameter(dense.gate.weight.detach().clone())
        if config.router_score_bias:
            gate.e_score_correction_bias = dense.gate.e_score_correction_bias.detach().clone()
        self.moe.deepspeed_moe.gate = gate
        stacked = dict(dense.experts.named_parameters())
        for i, expert in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
            for name, param in expert.named_parameters():
                param.data.copy_(stacked[name][self.first_expert + i])
                if tp > 1:
                    # DeepSpeed's expert groups are consecutive ranks, so with tp | ep the tp peers hold different
                    # experts: the global grad norm must count them on every tp rank, not on tp rank 0 only
                    mark_tensor_parallel(param)
        if config.num_shared_experts:
            self.shared_experts = dense.shared_experts
            if config.shared_expert_gate:
                self.shared_expert_gate = dense.shared_expert_gate

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        y_BSD, router, _ = self.moe(x_BSD)  # ProjectGate's RouterOutput, in DeepSpeed's aux-loss slot
        if self.config.router_aux_loss_per_sequence:  # DeepSpeed hands the gate the tokens without their sequences
            router.aux_loss = balance_loss(self.config, router.probs_TE, router.experts_TK, x_BSD.shape[0])
        if self.config.num_shared_experts:
            y_BSD = y_BSD + shared_output(self, x_BSD)
        return y_BSD, router


def _gather_tokens_flat(input_: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """DeepSpeed's `_gather_tokens` with the input flattened to match its flat output buffer.

    Stock DeepSpeed 0.19 passes gloo a flat output next to a shaped input, which gloo rejects
    ("ProcessGroupGloo::allgather: invalid tensor size") while NCCL accepts it. The result is identical.
    """
    mpu = groups.mpu
    input_ = input_.contiguous()
    world = bwc_tensor_model_parallel_world_size(mpu)
    if world == 1:
        return input_
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_group

    buffer = torch.empty(world * input_.numel(), dtype=input_.dtype, device=input_.device)
    dist.all_gather_into_tensor(buffer, input_.view(-1), group=bwc_tensor_model_parallel_group(mpu))
    parts = [buffer.narrow(0, input_.numel() * i, input_.numel()).view_as(input_) for i in range(world)]
    return torch.cat(parts, dim=dim).contiguous()


def install_gloo_gather_shim() -> None:
    """Route DeepSpeed's MoE token gather through `_gather_tokens_flat`, process-wide (idempotent).

    Why a shim: DeepSpeed 0.19's `deepspeed.moe.mappings._gather_tokens` (used with tp > 1 and ep > 1) fails on gloo
    and has no option to avoid it. Only `groups.RankGroups` calls this, once, at group setup and only on gloo with
    tp > 1 and ep > 1: NCCL runs DeepSpeed's own gather untouched.
    """
    ds_mappings._gather_tokens = _gather_tokens_flat
