"""The validation loss, every `train.eval_every` steps and at the last step, on any layout.

An evaluation runs `train.eval_batches` global batches of validation sequences, addressed like training batches
(`StepBatches(..., split="validation")`), so every layout evaluates the same sequences. No gradients, dropout-free
(the model has none), routing as in training. pp == 1: the engine's forward under `torch.no_grad()`; pp > 1: the
pipeline engine's `eval_batch`, whose loss function on the last stage (`pipeline.PipelineLoss`, the PipelineModule's
`loss_fn`) keeps each micro-batch's `StepStats`. Like a training step, every rank contributes its `StepStats` (losses
only: `without_expert_counts`) summed over its micro-batches (zeros on ranks that do not see the loss);
`StepStats.all_reduce` and `StepStats.mean` give the averages.
"""

from __future__ import annotations

import torch

from ..losses import StepStats
from ..parallel import Layout
from ..recipe import Recipe
from .data import StepBatches
from .distributed import collective_device


class Validation:
    def __init__(self, recipe: Recipe, engine, layout: Layout, rank: int):
        self.every, self.last = recipe.train.eval_every, recipe.train.steps
        self.batches_per_eval = recipe.train.eval_batches
        self.engine, self.layout = engine, layout
        self.batches = StepBatches(recipe, layout.dp, layout.coords(rank)["data"], split="validation") \
            if self.every else None
        self.num_layers = len(recipe.moe_config().moe_layers)

    def due(self, step: int) -> bool:
        """Whether an evaluation follows optimizer step `step` (1-based)."""
        return bool(self.every) and (step % self.every == 0 or step == self.last)

    def run(self) -> dict[str, float]:
        total = StepStats.zeros(self.num_layers, 0)
        for b in range(self.batches_per_eval):
            total = total + self._sums(self.batches.micro_batches(b))
        mean = total.all_reduce(collective_device()).mean(self.batches_per_eval * self.batches.accumulation, self.layout.dp,
                                       self.layout.tp)
        return {"val_loss": mean.loss.item(), "val_lm_loss": mean.lm_loss.item(), "val_aux_loss": mean.aux_loss.item()}

    def _sums(self, micro_batches: list[torch.Tensor]) -> StepStats:
        engine = self.engine
        if self.layout.pp > 1:
            engine.eval_batch(iter([(ids.to(engine.device), ids.to(engine.device)) for ids in micro_batches]),
                              num_micro_batches=len(micro_batches))
            return engine.module.loss_fn.take().without_expert_counts()
        engine.eval()
        try:
            stats = []
            with torch.no_grad():
                for ids in micro_batches:
                    ids = ids.to(engine.device)
                    out = engine(input_ids=ids, labels=ids, use_cache=False)
                    stats.append(StepStats.of_output(out).without_expert_counts())
            return StepStats.total(stats, self.num_layers, 0)
        finally:
            engine.train()
