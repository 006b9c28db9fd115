"""Documents from Hugging Face `datasets`, tokenized once into a token cache on disk.

Sources (`data.source`): `text` (.txt/.text/.md: one document per paragraph, i.e. per blank-line-separated block),
`json` (.json/.jsonl, one document per record) and `parquet` (one per row), each a file or a folder searched
recursively in sorted path order; `hub` (`data.name`, `data.subset`, `data.split`) when a network is there.
`data.text_field` names the column holding the text. Every source is read with `datasets`' streaming mode, so a
corpus larger than memory passes through in batches, and `data.max_documents` can stop a very large one early.

Train/validation split: document i (in source order) is a validation document when
`floor((i+1)*f) > floor(i*f)` with f = `data.validation_fraction`, i.e. exactly a fraction f of the documents,
evenly spread, the same on every machine. The tokenizer is trained on training documents only.

Token cache: `OUTPUT_DIR/data_cache/<key>/{train,validation}.bin` hold every document's ids followed by EOS, as
uint16 (uint32 when the vocabulary needs it), plus `meta.json`. The key hashes the files (names, sizes, mtimes) or
the hub coordinates, the text field, the split settings and the tokenizer's content, so a changed corpus or
tokenizer is tokenized again and an unchanged one never is. The folder appears whole (written under a temporary
name, then renamed) or not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..recipe import Recipe, RecipeError
from .staging import staging_folder
from .tokenizer import build_tokenizer, save_with_run
from .tokenizer import fingerprint as tokenizer_fingerprint

EXTENSIONS = {"text": (".txt", ".text", ".md"), "json": (".json", ".jsonl"), "parquet": (".parquet",)}
SPLITS = ("train", "validation")
ENCODE_BATCH = 256  # documents per tokenizer call


def data_files(recipe: Recipe) -> list[Path]:
    """The local files of the corpus, in sorted order (a folder is searched recursively)."""
    d = recipe.data
    path, extensions = Path(d.path or ""), EXTENSIONS[d.source]
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise RecipeError("data.path", f"{d.path!r} does not exist; fix the path")
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.name.endswith(extensions))
    if not files:
        raise RecipeError("data.path", f"folder {d.path!r} holds no {'/'.join(extensions)} files for source "
                                       f"{d.source!r}; point data.path at the corpus or change data.source")
    return files


def data_fingerprint(recipe: Recipe) -> str:
    """Changes when the documents could have changed: the files' names, sizes and mtimes, or the hub coordinates."""
    d = recipe.data
    parts: list[Any] = [d.source, d.text_field, d.validation_fraction, d.max_documents]
    if d.source == "hub":
        parts += [d.name, d.subset, d.split]
    else:
        for f in data_files(recipe):
            stat = f.stat()
            parts.append([str(f.resolve()), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


@contextlib.contextmanager
def _hub_left_alone() -> Iterator[None]:
    """`datasets` in offline mode while it opens local files. Even for local files `load_dataset` sends a HEAD
    request to S3 "to update the download count" (timeout 3 s, per call, twice per preparation): on a machine where
    the hub does not answer, that was seconds of waiting before anything, or before a one-line error. Restored after,
    so a hub source in the same process is unaffected."""
    import datasets.config

    saved = datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = True, False
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = saved


def _stream(recipe: Recipe):
    import datasets

    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach the user as our one line
    d = recipe.data
    if d.source == "hub":
        try:
            return datasets.load_dataset(d.name, d.subset, split=d.split, streaming=True)
        except Exception as err:  # offline, unknown name, bad subset or split: all reach the user as one line
            raise RecipeError("data.name", f"cannot open hub dataset {d.name!r} ({_first_line(err)}); check the "
                                           "name, subset, split and network (HF_HUB_OFFLINE), or use a local source "
                                           "(text, json, parquet)") from None
    files = [str(f) for f in data_files(recipe)]
    extra = {"sample_by": "paragraph"} if d.source == "text" else {}
    try:
        with _hub_left_alone():
            return datasets.load_dataset(d.source, data_files=files, split="train", streaming=True, **extra)
    except StopIteration:  # `datasets` infers the columns from the first record: there is none
        raise no_documents(recipe, records=0) from None
    except Exception as err:
        raise RecipeError("data.path", f"cannot read {d.path!r} as {d.source} ({_first_line(err)}); "
                                       "fix the files or data.source") from None


def no_documents(recipe: Recipe, records: int) -> RecipeError:
    d = recipe.data
    what = "no records" if records == 0 else f"{records} record{'s' if records > 1 else ''}, no text in {d.text_field!r}"
    return RecipeError("data.path", f"{d.path or d.name!r} holds no documents ({what}); point data.path at a corpus "
                                    "with text")


def documents(recipe: Recipe) -> Iterator[tuple[str, str]]:
    """(split, text) for every document of the corpus, in source order (streamed). A corpus without one non-empty
    document is a RecipeError (`no_documents`)."""
    d = recipe.data
    field, fraction = d.text_field, d.validation_fraction
    rows = iter(_stream(recipe))
    index = found = 0
    while d.max_documents is None or index < d.max_documents:
        try:
            row = next(rows)
        except StopIteration:
            if not found:
                raise no_documents(recipe, index) from None
            return
        except Exception as err:  # a malformed record surfaces while streaming
            raise RecipeError("data.path", f"cannot read document {index} of {d.path or d.name!r} "
                                           f"({_first_line(err)}); fix the file") from None
        if field not in row:
            raise RecipeError("data.text_field", f"{field!r} is not a field of the documents (fields: "
                                                 f"{', '.join(map(str, row))}); set data.text_field to one of them")
        text = row[field]
        if text is not None and not isinstance(text, str):
            raise RecipeError("data.text_field", f"field {field!r} holds {type(text).__name__}, not text "
                                                 f"(document {index}); choose a field that holds strings")
        is_validation = math.floor((index + 1) * fraction) > math.floor(index * fraction)
        index += 1
        if text:
            found += 1
            yield ("validation" if is_validation else "train"), text


@dataclass(frozen=True)
class TokenCache:
    folder: Path
    meta: dict[str, Any]

    def tokens(self, split: str) -> np.ndarray:
        """All ids of a split (memory-mapped: only what is read is paged in)."""
        count = self.meta["tokens"][split]
        if count == 0:
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(self.folder / f"{split}.bin", dtype=self.meta["dtype"], mode="r", shape=(count,))

    def summary(self) -> dict[str, Any]:
        return {k: self.meta[k] for k in ("documents", "tokens", "vocab_size", "eos_id", "tokenizer", "key")}


def prepare(recipe: Recipe) -> TokenCache:
    """The recipe's token cache, building the tokenizer and tokenizing the corpus when they are not on disk yet."""
    fingerprint = data_fingerprint(recipe)
    tokenizer, fresh = build_tokenizer(
        recipe, lambda: (text for split, text in documents(recipe) if split == "train"), fingerprint)
    key = hashlib.sha256(f"{fingerprint}:{tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()[:16]
    folder = recipe.output_dir / "data_cache" / key
    if not (folder / "meta.json").is_file():
        _write_cache(recipe, tokenizer, key, folder)
    if fresh:  # saved once the whole corpus has tokenized: a bad corpus leaves neither cache nor tokenizer
        save_with_run(tokenizer, recipe, fingerprint)
    return TokenCache(folder, json.loads((folder / "meta.json").read_text()))


def _write_cache(recipe: Recipe, tokenizer, key: str, folder: Path) -> None:
    from tokenizers import Tokenizer

    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    if tokenizer.is_fast:
        # text that happens to contain "<|endoftext|>" is text, not a document boundary
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.encode_special_tokens = True

        def encode(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    else:
        def encode(texts: list[str]) -> list[list[int]]:
            return tokenizer(texts, add_special_tokens=False)["input_ids"]

    tmp = staging_folder(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {split: {"documents": 0, "tokens": 0} for split in SPLITS}
    # a large corpus takes seconds to minutes: say what is happening once the first document is read (a corpus that
    # fails at once shows its error line alone), a bar on a terminal, and what was written
    started = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(desc="tokenizing", unit=" docs", disable=None, leave=False, mininterval=0.5)  # None: off a terminal
    read = 0
    try:
        outputs = {split: (tmp / f"{split}.bin").open("wb") for split in SPLITS}
        pending: dict[str, list[str]] = {split: [] for split in SPLITS}

        def flush(split: str) -> None:
            ids = []
            for doc in encode(pending[split]):
                ids.extend(doc)
                if eos is not None:
                    ids.append(eos)
            outputs[split].write(np.asarray(ids, dtype=dtype).tobytes())
            counts[split]["documents"] += len(pending[split])
            counts[split]["tokens"] += len(ids)
            pending[split] = []

        for split, text in documents(recipe):
            if not read:
                print(f"moe: tokenizing {recipe.data.path or recipe.data.name} into the token cache {folder} ...",
                      file=sys.stderr, flush=True)
            pending[split].append(text)
            read += 1
            bar.update()
            if len(pending[split]) >= ENCODE_BATCH:
                flush(split)
        for split in SPLITS:
            flush(split)
            outputs[split].close()
        meta = {"key": key, "dtype": np.dtype(dtype).name, "vocab_size": vocab, "eos_id": eos,
                "tokenizer": recipe.data.tokenizer, "documents": {s: counts[s]["documents"] for s in SPLITS},
                "tokens": {s: counts[s]["tokens"] for s in SPLITS}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if folder.exists():  # another preparer (another node on a shared disk) finished first: same content
            shutil.rmtree(tmp)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    print(f"moe: token cache written in {time.perf_counter() - started:.1f} s: "
          + ", ".join(f"{s} {counts[s]['documents']:,} documents, {counts[s]['tokens']:,} tokens" for s in SPLITS),
          file=sys.stderr, flush=True)
