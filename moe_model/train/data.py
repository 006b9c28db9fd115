"""Training batches, addressed by (step, micro-batch, data rank) so that every layout sees the same samples.

An optimizer step consumes the global samples [step*G, (step+1)*G). Micro-batch m of data rank r takes the
`micro_batch_size` samples starting at step*G + (m*dp + r)*micro_batch_size. The set of samples in a step is the same
for any dp, so per-step losses of different layouts can be compared.
"""

from __future__ import annotations

import torch

from ..recipe import Recipe, RecipeError


class SyntheticSequences:
    """Learnable arithmetic sequences: x[i+1] = x[i] + stride (mod V), a random start and stride per sample.

    After two tokens the rest is predictable, so a model that learns shows a loss falling well below ln(V).
    """

    def __init__(self, vocab_size: int, seq_len: int, seed: int, max_stride: int = 8):
        self.vocab_size, self.seq_len, self.seed, self.max_stride = vocab_size, seq_len, seed, max_stride

    def sample(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        start = torch.randint(self.vocab_size, (1,), generator=g)
        stride = torch.randint(1, self.max_stride + 1, (1,), generator=g)
        return (start + stride * torch.arange(self.seq_len)) % self.vocab_size

    def batch(self, first_index: int, size: int) -> torch.Tensor:
        return torch.stack([self.sample(first_index + i) for i in range(size)])


class StepBatches:
    """The micro-batches one data rank runs in one optimizer step."""

    def __init__(self, recipe: Recipe, dp: int, dp_rank: int):
        if recipe.data.source != "synthetic":
            raise RecipeError("data.source", f"{recipe.data.source!r} is not wired into training yet; use synthetic")
        self.source = SyntheticSequences(recipe.model.vocab_size, recipe.train.seq_len, recipe.train.seed)
        self.global_batch = recipe.train.global_batch_size
        self.micro = recipe.parallel.micro_batch_size
        self.dp, self.dp_rank = dp, dp_rank
        self.accumulation = self.global_batch // (self.micro * dp)

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        first = step * self.global_batch
        return [self.source.batch(first + (m * self.dp + self.dp_rank) * self.micro, self.micro)
                for m in range(self.accumulation)]
