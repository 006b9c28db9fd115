"""The run's tokenizer, built or loaded with no network, saved under `OUTPUT_DIR/tokenizer` beside the checkpoints.

`data.tokenizer` is one of
- `train`: a byte-level BPE trained with `tokenizers` on the training split (never on validation documents), with
  `data.vocab_size` (else `model.vocab_size`) ids: `<|endoftext|>` (id 0), the 256 byte symbols, then merges;
- `byte`: ids 0..255 are the bytes of the UTF-8 text, id 256 is `<|endoftext|>` (so model.vocab_size >= 257);
- a local path to any Hugging Face tokenizer (`AutoTokenizer.from_pretrained(path, local_files_only=True)`).

Both built kinds are byte-level with no normalizer, so `decode(encode(text)) == text` for any text. What is saved is
a `PreTrainedTokenizerFast` directory (`AutoTokenizer.from_pretrained(OUTPUT_DIR/tokenizer)` loads it) plus
`moe_tokenizer.json`, the spec it was built from: a run that restarts reuses its trained tokenizer instead of
training again, so a resumed run tokenizes exactly as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..recipe import Recipe, RecipeError
from .staging import staging_folder

EOS = "<|endoftext|>"
SPEC_FILE = "moe_tokenizer.json"
BYTE_VOCAB = 257  # 256 bytes + EOS


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (what `ByteLevel` works on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _wrap(backend) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, clean_up_tokenization_spaces=False)


def _byte_level(backend):
    from tokenizers import decoders, pre_tokenizers

    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Id b is byte b (0..255); id 256 is EOS. No merges, so every byte is one token."""
    from tokenizers import Tokenizer, models

    vocab = {char: b for b, char in bytes_to_unicode().items()}
    vocab[EOS] = 256
    backend = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])))
    backend.add_special_tokens([EOS])
    return _wrap(backend)


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of at most `vocab_size` ids trained on `texts` (fewer when the text has fewer merges)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size < BYTE_VOCAB:
        raise RecipeError("data.vocab_size", f"{vocab_size} is too small for a byte-level BPE, which needs "
                                             f"{BYTE_VOCAB} ids (256 bytes + {EOS}); use at least {BYTE_VOCAB}")
    backend = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  show_progress=sys.stderr.isatty(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    return _wrap(backend)


def load_local(path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if not Path(path).exists():
        raise RecipeError("data.tokenizer", f"{path!r} is not train, byte or an existing tokenizer folder; fix the "
                                            "path (relative paths are taken from the current directory)")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError("data.tokenizer", f"{path!r} does not load as a Hugging Face tokenizer ({reason}); "
                                            "point it at a folder written by save_pretrained") from None


def fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A content hash: two tokenizers with the same fingerprint give the same ids for any text."""
    if tokenizer.is_fast:
        text = tokenizer.backend_tokenizer.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items())) + type(tokenizer).__name__
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def vocab_size_for_training(recipe: Recipe) -> int:
    return recipe.data.vocab_size or recipe.model.vocab_size


def spec_of(recipe: Recipe, data_fingerprint: str) -> dict[str, Any]:
    kind = recipe.data.tokenizer
    if kind == "train":
        return {"kind": "train", "vocab_size": vocab_size_for_training(recipe), "data": data_fingerprint}
    if kind == "byte":
        return {"kind": "byte"}
    return {"kind": "path", "path": str(Path(kind).resolve())}


def check_fits(tokenizer: PreTrainedTokenizerBase, recipe: Recipe) -> None:
    ids = len(tokenizer)
    if ids > recipe.model.vocab_size:
        field = "data.vocab_size" if recipe.data.tokenizer == "train" else "data.tokenizer"
        raise RecipeError(field, f"the tokenizer has {ids} ids but model.vocab_size is {recipe.model.vocab_size}; "
                                 f"set model.vocab_size >= {ids} or use a smaller tokenizer")


def saved_dir(recipe: Recipe) -> Path:
    return recipe.output_dir / "tokenizer"


def load_saved(recipe: Recipe, data_fingerprint: str) -> PreTrainedTokenizerBase | None:
    """The run's saved tokenizer when it was built from the same spec (a restart), else None."""
    folder = saved_dir(recipe)
    spec_path = folder / SPEC_FILE
    if not spec_path.is_file() or json.loads(spec_path.read_text()) != spec_of(recipe, data_fingerprint):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def build_tokenizer(recipe: Recipe, training_texts: Callable[[], Iterable[str]],
                    data_fingerprint: str) -> tuple[PreTrainedTokenizerBase, bool]:
    """(the recipe's tokenizer, whether it still has to be saved): the run's saved one when its spec matches,
    else built now. `training_texts` is called only when a BPE must be trained. Raises RecipeError (one line) on bad
    input or when its ids do not fit the model."""
    tokenizer = load_saved(recipe, data_fingerprint)
    fresh = tokenizer is None
    if fresh:
        kind = recipe.data.tokenizer
        if kind == "train":
            started = time.perf_counter()
            tokenizer = train_bpe(_announced(training_texts(), recipe), vocab_size_for_training(recipe))
            print(f"moe: tokenizer trained in {time.perf_counter() - started:.1f} s ({len(tokenizer):,} ids)",
                  file=sys.stderr, flush=True)
        elif kind == "byte":
            tokenizer = byte_tokenizer()
        else:
            tokenizer = load_local(kind)
    check_fits(tokenizer, recipe)
    return tokenizer, fresh


def _announced(texts: Iterable[str], recipe: Recipe) -> Iterator[str]:
    """`texts`, saying on the first one that a BPE is being trained: seconds on a corpus of megabytes (this runs on
    the preparing rank only; `tokenizers`' own bar shows on a terminal). A corpus that fails at once shows its error
    line alone."""
    for i, text in enumerate(texts):
        if i == 0:
            print(f"moe: training a byte-level BPE tokenizer ({vocab_size_for_training(recipe):,} ids) on the training "
                  f"documents of {recipe.data.path or recipe.data.name} ...", file=sys.stderr, flush=True)
        yield text


def save_with_run(tokenizer: PreTrainedTokenizerBase, recipe: Recipe, data_fingerprint: str) -> None:
    save(tokenizer, spec_of(recipe, data_fingerprint), saved_dir(recipe))


def resolve_tokenizer(recipe: Recipe, training_texts: Callable[[], Iterable[str]],
                      data_fingerprint: str) -> PreTrainedTokenizerBase:
    """Build (or reuse) the recipe's tokenizer and save it with the run (the folder is replaced whole or not at all)."""
    tokenizer, fresh = build_tokenizer(recipe, training_texts, data_fingerprint)
    if fresh:
        save_with_run(tokenizer, recipe, data_fingerprint)
    return tokenizer


def save(tokenizer: PreTrainedTokenizerBase, spec: dict[str, Any], folder: Path) -> None:
    tmp = staging_folder(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
