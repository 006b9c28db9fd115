"""The validation loss, every `train.eval_every` steps and at the last step, on any layout.

An evaluation runs `train.eval_batches` global batches of validation sequences, addressed like training batches
(`StepBatches(..., split="validation")`), so every layout evaluates the same sequences. No gradients, dropout-free
(the model has none), routing as in training. pp == 1: the engine's forward under `torch.no_grad()`; pp > 1: the
pipeline engine's `eval_batch`, whose loss function on the last stage keeps each micro-batch's parts. Like a
training step, every rank contributes `[loss, lm_loss, aux_loss, z_loss]` summed over its micro-batches (zeros on
ranks that do not see the loss), and one all-reduce and one division give the averages.
"""

from __future__ import annotations

import torch

from ..parallel import Layout
from ..recipe import Recipe
from .data import StepBatches


class Validation:
    def __init__(self, recipe: Recipe, engine, layout: Layout, rank: int):
        self.every, self.last = recipe.train.eval_every, recipe.train.steps
        self.batches_per_eval = recipe.train.eval_batches
        self.engine, self.layout = engine, layout
        self.batches = StepBatches(recipe, layout.dp, layout.coords(rank)["data"], split="validation") \
            if self.every else None

    def due(self, step: int) -> bool:
        """Whether an evaluation follows optimizer step `step` (1-based)."""
        return bool(self.every) and (step % self.every == 0 or step == self.last)

    def run(self) -> dict[str, float]:
        import torch.distributed as dist

        total = torch.zeros(4)
        for b in range(self.batches_per_eval):
            total += self._sums(self.batches.micro_batches(b))
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total)
        mean = (total / (self.batches_per_eval * self.batches.accumulation * self.layout.dp * self.layout.tp)).cpu()
        return {"val_loss": mean[0].item(), "val_lm_loss": mean[1].item(), "val_aux_loss": mean[2].item()}

    def _sums(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        engine = self.engine
        if self.layout.pp > 1:
            engine.eval_batch(iter([(ids.to(engine.device), ids.to(engine.device)) for ids in micro_batches]),
                              num_micro_batches=len(micro_batches))
            parts = engine.module.project_loss.take()
            return torch.stack(parts).sum(0)[:4].cpu() if parts else torch.zeros(4)
        engine.eval()
        try:
            total = torch.zeros(4)
            with torch.no_grad():
                for ids in micro_batches:
                    ids = ids.to(engine.device)
                    out = engine(input_ids=ids, labels=ids, use_cache=False)
                    total += torch.stack([out.loss, out.lm_loss, out.aux_loss, out.z_loss]).float().cpu()
            return total
        finally:
            engine.train()
