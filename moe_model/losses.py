"""The training loss and one step's statistics: the one definition the model, the pipeline and the trainer share.

Training loss (what `MoEForCausalLM` returns as `loss` and the pipeline's loss function returns):

    loss = lm_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss

(the z term only where its coefficient is positive). `aux_loss` and `z_loss` are the means over the MoE layers of
`routing.load_balancing_loss` and `routing.router_z_loss`.

`StepStats` carries `loss, lm_loss, aux_loss, z_loss` and the routes per expert of every layer (`expert_counts_LE`)
of a micro-batch, summed with `+` over micro-batches, then over ranks by one all-reduce, then averaged by `mean`.
This module imports torch only: a saved model directory carries it next to modeling.py (remote code).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


def training_loss(lm_loss: torch.Tensor, aux_loss: torch.Tensor, z_loss: torch.Tensor, config) -> torch.Tensor:
    """`lm_loss + router_aux_loss_coef * aux_loss (+ router_z_loss_coef * z_loss)`; `config` is an `MoEConfig`."""
    loss = lm_loss + config.router_aux_loss_coef * aux_loss
    if config.router_z_loss_coef > 0:
        loss = loss + config.router_z_loss_coef * z_loss
    return loss


@dataclass
class StepStats:
    """Sums over micro-batches (and ranks, after `all_reduce`) of the loss terms and expert loads, fp32, no grad.

    The four losses are scalars; `expert_counts_LE` is [layers, experts] (routes each expert received, before any
    capacity drop). A rank that does not see the loss (an earlier pipeline stage) contributes `zeros`.
    """

    loss: torch.Tensor
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_counts_LE: torch.Tensor

    @classmethod
    def of(cls, loss, lm_loss, aux_loss, z_loss, expert_counts_LE) -> StepStats:
        """One micro-batch's figures, detached and in fp32 (on the device they were computed on)."""
        return cls(*(t.detach().float() for t in (loss, lm_loss, aux_loss, z_loss, expert_counts_LE)))

    @classmethod
    def of_output(cls, out) -> StepStats:
        """From a `MoECausalLMOutput` computed with labels."""
        return cls.of(out.loss, out.lm_loss, out.aux_loss, out.z_loss, out.expert_counts_LE)

    @classmethod
    def zeros(cls, num_layers: int, num_experts: int) -> StepStats:
        return cls.from_flat(torch.zeros(4 + num_layers * num_experts), num_layers, num_experts)

    @classmethod
    def total(cls, items: list[StepStats], num_layers: int, num_experts: int) -> StepStats:
        """The sum of `items` on the CPU (zeros when there are none)."""
        result = cls.zeros(num_layers, num_experts)
        for item in items:
            result = result + item.cpu()
        return result

    def __add__(self, other: StepStats) -> StepStats:
        return StepStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def without_expert_counts(self) -> StepStats:
        """The losses only (`expert_counts_LE` [L, 0]): what an evaluation reduces. The all-reduce stays four numbers
        long, as sums over ranks depend on the vector's length (gloo's ring splits it into chunks)."""
        return StepStats(self.loss, self.lm_loss, self.aux_loss, self.z_loss, self.expert_counts_LE[:, :0])

    def cpu(self) -> StepStats:
        return StepStats(*(getattr(self, f.name).cpu() for f in fields(self)))

    def flat(self) -> torch.Tensor:
        """`[loss, lm_loss, aux_loss, z_loss, expert_counts_LE...]`, one vector for one collective."""
        losses = torch.stack([self.loss, self.lm_loss, self.aux_loss, self.z_loss]).reshape(4)
        return torch.cat([losses, self.expert_counts_LE.reshape(-1).to(losses.device)])

    @classmethod
    def from_flat(cls, flat: torch.Tensor, num_layers: int, num_experts: int) -> StepStats:
        return cls(flat[0], flat[1], flat[2], flat[3], flat[4:].reshape(num_layers, num_experts))

    def all_reduce(self, device: torch.device, group=None) -> StepStats:
        """The sum over the ranks of `group` (default: all), as one all-reduce on `device` (the backend's:
        `train.distributed.collective_device`), returned on the CPU."""
        import torch.distributed as dist

        flat = self.flat().to(device)
        dist.all_reduce(flat, group=group)
        L, E = self.expert_counts_LE.shape
        return StepStats.from_flat(flat.cpu(), L, E)

    def mean(self, micro_batches: int, dp: int, tp: int) -> StepStats:
        """Averages of a step's all-reduced sums: every tp rank of every data shard that sees the loss holds the
        same figures, so the losses divide by micro-batches x dp x tp and the expert loads (already summed over the
        micro-batches and data shards of one step) by tp."""
        count = micro_batches * dp * tp
        return StepStats(self.loss / count, self.lm_loss / count, self.aux_loss / count, self.z_loss / count,
                         self.expert_counts_LE / tp)
