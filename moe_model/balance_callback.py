"""Aux-loss-free balancing under transformers' `Trainer` (and TRL's trainers built on it).

`Trainer` never moves the score bias, so without this callback a model with `router_bias_update_rate` > 0 trains
unbalanced. Usage: `Trainer(model=model, args=args, ..., callbacks=[ScoreBiasCallback()])`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .modeling import MoEModel, MoESparseBlock
from .routing import bias_update


class ScoreBiasCallback(TrainerCallback):
    """Moves every MoE layer's `e_score_correction_bias` after each optimizer step, as `moe train` does.

    Contract: for each `MoEModel` found under the trained model (by module type, so under PEFT, DDP or any other
    wrapper), the routes of every forward run in training mode with gradients enabled (`model.training` and
    `torch.is_grad_enabled()`: no eval, no generation, no no-grad scoring pass; the top-level forward, so
    gradient-checkpoint recomputation is not counted twice) are summed into `counts_LE` [MoE layers, E] over the
    micro-batches of one optimizer step; at `on_step_end` (after the optimizer step) they are summed over the
    data-parallel ranks when torch.distributed is initialised (so every rank moves its copy the same way), and each
    layer's bias moves in place, fp32, without gradient, by `routing.bias_update`:

        bias_e += rate * sign(mean_e' counts_LE[l, e'] - counts_LE[l, e])

    (DeepSeek-V3, section 2.1.2, "auxiliary-loss-free load balancing"). `rate` defaults to the model config's
    `router_bias_update_rate`; where it is 0 or the config has no `router_score_bias`, the callback warns once at
    `on_train_begin` and does nothing. The counts are the model's `expert_counts_LE`: every routed token, padding
    included (the project's own trainer packs its batches and never pads).
    """

    def __init__(self, rate: float | None = None) -> None:
        self.rate = rate
        self._counts: dict[MoEModel, torch.Tensor] = {}
        self._handles: list[Any] = []

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        self._remove_hooks()
        found = [m for m in (model.modules() if model is not None else ()) if isinstance(m, MoEModel)]
        if not found:
            raise ValueError(f"ScoreBiasCallback: no moe_model MoEModel under the trained model "
                             f"({type(model).__name__}): nothing to balance")
        for moe in found:
            rate = moe.config.router_bias_update_rate if self.rate is None else self.rate
            biases = self._biases(moe)
            if rate <= 0 or not biases:
                warnings.warn(f"ScoreBiasCallback: the score bias stays as it is (router_score_bias="
                              f"{moe.config.router_score_bias}, rate {rate}): no aux-loss-free balancing", stacklevel=2)
                continue
            if any(b.dtype != torch.float32 for b in biases):  # steps of 0.001 vanish in bf16 near 1
                warnings.warn("ScoreBiasCallback: the score bias is not fp32 (was the model cast?): its updates "
                              "are rounded", stacklevel=2)
            self._counts[moe] = torch.zeros(len(biases), biases[0].numel(), dtype=torch.int64, device=biases[0].device)
            self._handles.append(moe.register_forward_hook(self._count))

    def _count(self, module: nn.Module, args: Any, output: Any) -> None:
        if module.training and torch.is_grad_enabled():
            counts = self._counts[module]
            counts += output.expert_counts_LE.to(counts.device)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        for moe, counts_LE in self._counts.items():
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(counts_LE)  # every rank holds this tensor: no rank can skip it
            rate = moe.config.router_bias_update_rate if self.rate is None else self.rate
            delta_LE = bias_update(counts_LE, rate)
            with torch.no_grad():
                for row, bias in enumerate(self._biases(moe)):
                    bias.add_(delta_LE[row].to(bias.device, bias.dtype))
            counts_LE.zero_()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._counts = [], {}

    @staticmethod
    def _biases(moe: MoEModel) -> list[torch.Tensor]:
        """The score biases of `moe`'s MoE layers, in the order of `expert_counts_LE`'s rows."""
        biases = [layer.mlp._score_bias() for layer in moe.layers if isinstance(layer.mlp, MoESparseBlock)]
        return [b for b in biases if b is not None]
