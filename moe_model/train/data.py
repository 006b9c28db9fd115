"""Training batches, addressed by (step, micro-batch, data rank) so that every layout sees the same samples.

An optimizer step consumes the global samples [step*G, (step+1)*G). Micro-batch m of data rank r takes the
`micro_batch_size` samples starting at step*G + (m*dp + r)*micro_batch_size. The set of samples in a step is the same
for any dp, so per-step losses of different layouts can be compared. The global sample index is also the data
position: there is no iterator state, so a run restarted at step N reads exactly the batches an uninterrupted run
reads at step N, on any number of data ranks.

Sources:
- `synthetic`: learnable arithmetic sequences (`SyntheticSequences`), validation from a disjoint index range;
- a corpus (`text`, `json`, `parquet`, `hub`; `corpus.py` reads and tokenizes it once into a token cache):
  `PackedSequences` cuts a split's token stream (documents in source order, each followed by EOS) into consecutive
  `seq_len` windows, so every sequence is full (no padding, fixed shapes for the pipeline engine at any seq_len).
  Training sample g is window `shuffle_epoch(g // n)(g % n)` of the n windows: each epoch visits every window once
  in a pseudo-random order (`Permutation`) that depends only on the seed and the epoch. An evaluation reads
  validation windows spread evenly over the validation split (`EvenlySpaced`), the same ones every time.
"""

from __future__ import annotations

import traceback
from typing import Protocol

import numpy as np
import torch

from ..recipe import Recipe, RecipeError
from .distributed import collective_device


class Samples(Protocol):
    def sample(self, index: int) -> torch.Tensor: ...


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


class SyntheticValidation:
    """Validation sample i is synthetic sample -1-i: never one a training step (index >= 0) reads."""

    def __init__(self, source: SyntheticSequences):
        self.source = source

    def sample(self, index: int) -> torch.Tensor:
        return self.source.sample(-1 - index)


MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finalizer: a fast, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


class Permutation:
    """A pseudo-random bijection of [0, n) with O(1) memory: a 4-round balanced Feistel network on the smallest
    even number of bits covering n, with cycle walking (re-encrypt until the value falls below n)."""

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        if n <= 0:
            raise ValueError("a permutation needs n >= 1")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [_mix(key * 8 + r) for r in range(self.ROUNDS)]

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(f"{index} is outside [0, {self.n})")
        x = self._encrypt(index)
        while x >= self.n:
            x = self._encrypt(x)
        return x


class PackedSequences:
    """Consecutive `seq_len` windows of a token stream; the tail shorter than a window is left out."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.count = len(tokens) // seq_len

    def window(self, i: int) -> torch.Tensor:
        start = i * self.seq_len
        return torch.from_numpy(np.asarray(self.tokens[start:start + self.seq_len], dtype=np.int64))


class ShuffledEpochs:
    """Training sample g: window perm_e(g mod n) of epoch e = g // n, with a fresh permutation per epoch."""

    def __init__(self, windows: PackedSequences, seed: int):
        self.windows, self.seed = windows, seed
        self._epoch, self._perm = -1, None

    def sample(self, index: int) -> torch.Tensor:
        epoch, i = divmod(index, self.windows.count)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, Permutation(self.windows.count, _mix(self.seed) ^ epoch)
        return self.windows.window(self._perm(i))


class EvenlySpaced:
    """Validation: the `count` samples of an evaluation are windows spread evenly over the whole split (all of them,
    wrapping, when the split has fewer), so a short evaluation still covers every part of the held-out text."""

    def __init__(self, windows: PackedSequences, count: int):
        self.windows, self.count = windows, count

    def sample(self, index: int) -> torch.Tensor:
        n = self.windows.count
        return self.windows.window(index % n if self.count >= n else (index % self.count) * n // self.count)


def too_short(recipe: Recipe, split: str, tokens: int) -> RecipeError:
    field = "train.seq_len" if split == "train" else "data.validation_fraction"
    return RecipeError(field, f"the {split} split has {tokens} tokens, fewer than one sequence of "
                              f"{recipe.train.seq_len}; use a larger corpus, a shorter train.seq_len"
                              + (" or a larger validation_fraction" if split == "validation" else ""))


def corpus_samples(recipe: Recipe, split: str) -> Samples:
    """The split's samples from the token cache (which `prepare_data` must have written)."""
    from .corpus import prepare

    cache = prepare(recipe)
    windows = PackedSequences(cache.tokens(split), recipe.train.seq_len)
    if windows.count == 0:
        raise too_short(recipe, split, cache.meta["tokens"][split])
    if split == "train":
        return ShuffledEpochs(windows, recipe.train.seed)
    return EvenlySpaced(windows, recipe.train.eval_batches * recipe.train.global_batch_size)


class StepBatches:
    """The micro-batches one data rank runs in one optimizer step (or in one validation batch: split='validation')."""

    def __init__(self, recipe: Recipe, dp: int, dp_rank: int, split: str = "train"):
        if recipe.data.source == "synthetic":
            synthetic = SyntheticSequences(recipe.model.vocab_size, recipe.train.seq_len, recipe.train.seed)
            self.source: Samples = synthetic if split == "train" else SyntheticValidation(synthetic)
        else:
            self.source = corpus_samples(recipe, split)
        self.global_batch = recipe.train.global_batch_size
        self.micro = recipe.parallel.micro_batch_size
        self.dp, self.dp_rank = dp, dp_rank
        self.accumulation = self.global_batch // (self.micro * dp)

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        first = step * self.global_batch
        return [torch.stack([self.source.sample(first + (m * self.dp + self.dp_rank) * self.micro + i)
                             for i in range(self.micro)])
                for m in range(self.accumulation)]


def prepare_data(recipe: Recipe) -> tuple[str | None, dict]:
    """Every rank calls this before training: global rank 0 builds the tokenizer and the token cache, the others
    wait, then read it. Once for the whole run, not once per node: the output folder is one folder on every node
    (`ownership.not_shared_verdict` refuses a run where it is not), and several nodes building the same cache in it at
    once would race between their existence checks and their renames.

    Returns (the error line, or None on every rank when all went well; a summary of the data for the run config).
    """
    import torch.distributed as dist

    if recipe.data.source == "synthetic":
        return None, {"source": "synthetic"}
    error, summary = "", {}
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        try:
            summary = describe(recipe)
        except RecipeError as err:
            error = str(err)
        except Exception as err:  # anything else must still reach the other ranks, or they wait forever
            traceback.print_exc()
            error = f"data: preparing the corpus failed ({type(err).__name__}: {err})"
    failed = torch.tensor([1.0 if error else 0.0])
    if dist.is_initialized():
        failed = failed.to(collective_device())
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        return error or "data: preparing the corpus failed on another node; see that node's log", {}
    if not summary:
        summary = describe(recipe)  # cached now: cheap
    return None, summary


def describe(recipe: Recipe) -> dict:
    """Prepare (or find) the token cache and say what training will read from it."""
    from .corpus import prepare

    cache = prepare(recipe)
    seq_len, G = recipe.train.seq_len, recipe.train.global_batch_size
    train, validation = (cache.meta["tokens"][split] // seq_len for split in ("train", "validation"))
    if train == 0:
        raise too_short(recipe, "train", cache.meta["tokens"]["train"])
    if recipe.train.eval_every and validation == 0:
        raise too_short(recipe, "validation", cache.meta["tokens"]["validation"])
    return {**cache.summary(), "source": recipe.data.source, "sequences": {"train": train, "validation": validation},
            "epochs": recipe.train.steps * G / train, "cache": str(cache.folder)}
