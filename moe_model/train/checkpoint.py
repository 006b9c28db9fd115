"""Checkpoints that are complete or invisible, and exact resume.

Layout under `OUTPUT_DIR/checkpoints/`:

    step00000010/            DeepSpeed's own files (model, ZeRO optimizer, expert files), plus
        rng_rank<r>.pt       each rank's RNG state and data position
        portable_*           the states by global name and slice, which another layout resumes from (`reshard`)
        manifest.json        written by rank 0 after every rank has written: files, sizes and SHA-256 digests,
                             step, layout and ZeRO stage, the recipe's model section
    latest                   the tag of the newest complete checkpoint, replaced atomically after the manifest

A checkpoint is complete once its manifest exists (the manifest is written after every file, and `latest` moves
after the manifest), so a crash mid-save leaves the previous one as the newest. `latest` is a convenience for
people and tools: `resume: auto` and `moe export` find the newest checkpoint by scanning the `step*` folders, so a
missing or stale `latest` loses nothing. A checkpoint is intact when every file of its manifest exists with its size
and its SHA-256 digest (content, not only size: a file of the right size overwritten with zeros is caught).
`resume: auto` and `moe export` take the newest intact one, naming each newer one skipped and why; an explicit path
that is not intact is refused.

A write that fails during a save (a full disk, a quota, a file-size limit) stops the run with one line
(`SaveFailed`): the cause, the rank and file, the newest good checkpoint; the partial folder is removed (it frees
what it took). Every rank of a save goes through the same collectives (DeepSpeed's barriers, the portable states'
gathers), so a rank's first failure is kept, not raised, and its later writes are skipped (`Writes`); the ranks
agree on the outcome after the files and again after the manifest.

Cost: at save the digests are split over the ranks (rank r hashes files r, r + world, ... of the sorted listing,
streamed; hashlib has no parallel hasher) and gathered on rank 0; at resume global rank 0 alone verifies (reading
every file once) and tells the others (`Trainer`); `moe export` verifies what it exports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..metrics_file import read_metrics_lines
from ..parallel.layout import Layout
from ..recipe import RecipeError

MANIFEST = "manifest.json"
POINTER = "latest"
SAVE_FAILED = 74  # EX_IOERR: a checkpoint could not be written; free space (or raise the limit), then resume


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_digest(path: Path) -> str:
    """SHA-256 of the file's content, hex, read in chunks (never the whole file in memory)."""
    digest = hashlib.sha256()  # hashlib.file_digest would do this, but only from Python 3.11 (the project: 3.10+)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def save(engine, root: Path, step: int, layout: dict[str, int], keep: int,
         model: dict[str, Any] | None = None, zero_stage: int | None = None, portable_config=None) -> Path:
    """Every rank calls this at the same step. Returns the checkpoint directory. `model` (the recipe's model
    section) goes into the manifest so that a resume with another model is refused by name (`model_differences`).
    With `portable_config` (the model's `MoEConfig`) the states are also written free of the layout
    (`reshard.save`), so that another layout can resume."""
    tag = tag_for(step)
    rank = dist.get_rank()
    directory = root / tag
    if rank == 0:  # a folder of this tag saved before (a run resumed from an older one): incomplete until re-signed
        (directory / MANIFEST).unlink(missing_ok=True)
    dist.barrier()
    writes = Writes(directory)
    with _guarded(engine, writes):
        engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    writes(torch.save, {"step": step, "torch": torch.get_rng_state(), "python": random.getstate()},
           directory / f"rng_rank{rank}.pt")
    if portable_config is not None:
        from . import reshard

        reshard.save(engine, directory, Layout(**layout), portable_config, step, write=writes)
    coords = Layout(**layout).coords(rank)
    # which DeepSpeed model-parallel file (mp_rank_XX) holds which pipeline stage and tensor-parallel slice
    mp_file = (engine.mpu.get_model_parallel_rank() if engine.mpu is not None else 0, coords["pipe"], coords["model"])
    _settle(directory, _first([writes.failure]), step)  # every rank's files are on disk, or the save stops here
    names = [p.name for p in sorted(directory.iterdir()) if p.name != MANIFEST]
    world = dist.get_world_size()
    mine = {"mp_file": mp_file, "digests": {name: file_digest(directory / name) for name in names[rank::world]}}
    # an object collective, not a tensor one: an NCCL group has no CPU backend for a CPU tensor, and torch puts the
    # pickled objects on the current device itself (`distributed.bind_device` made it this rank's)
    everyone: list[dict[str, Any] | None] = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        files = {name: (directory / name).stat().st_size for name in names}
        mp_files = {int(m): {"pipe": int(pp), "tp": int(tp)} for m, pp, tp in (part["mp_file"] for part in everyone)}
        manifest = {"step": step, "layout": layout, "zero_stage": zero_stage, "portable": portable_config is not None,
                    "files": files, "model_parallel_files": mp_files,
                    "digest": "sha256", "digests": {k: v for part in everyone for k, v in part["digests"].items()}}
        if model is not None:
            manifest["model"] = model
        writes(_write_atomic, directory / MANIFEST, json.dumps(manifest, indent=2))
        writes(_write_atomic, root / POINTER, tag)
        if writes.failure is None:
            _prune(root, keep, tag)
    verdict = [writes.failure]
    dist.broadcast_object_list(verdict, src=0)
    _settle(directory, verdict[0], step)
    return directory


class SaveFailed(Exception):
    """A checkpoint could not be written; `str()` is the one line (the cause, the rank and file, the newest good
    checkpoint), the same on every rank."""


class Writes:
    """One rank's writes of one save: `writes(fn, *args)` calls `fn` until one of them fails, keeps that first
    failure (`failure`: rank, file, cause) and skips the rest, so the rank goes on through the save's collectives
    (why by hand: DeepSpeed's `save_checkpoint` raises out of a rank's file write and leaves its peers waiting in
    the next barrier)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.failure: dict[str, Any] | None = None

    def __call__(self, write: Callable[..., Any], *args, **kwargs) -> Any:
        if self.failure is not None:
            return None
        try:
            return write(*args, **kwargs)
        except (OSError, RuntimeError) as err:  # torch's zip writer reports a failed write as a RuntimeError
            target = next((Path(a) for a in (*args, *kwargs.values()) if isinstance(a, (str, Path))), None)
            cause, fix = write_failure_cause(err, target, self.directory)
            self.failure = {"rank": dist.get_rank(), "file": target.name if target else "?", "cause": cause,
                            "fix": fix}
            return None


def write_failure_cause(err: BaseException, target: Path | None, directory: Path) -> tuple[str, str]:
    """(what made a write fail, what to do about it), in words: the OS's cause (`No space left on device`, `Disk
    quota exceeded`, `File too large`) where it says; torch's zip writer names none (`unexpected pos`, `file write
    failed`), so then this process's file-size limit or the free space says it."""
    import errno
    import resource

    free = _free_bytes(directory)
    room = f"free space under {directory.parent} ({free / 1e9:.2f} GB free) or lower train.keep_checkpoints"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    too_large = ("raise the file-size limit (ulimit -f unlimited, or the scheduler's limit on file size) "
                 f"{'from ' + str(limit) + ' bytes ' if limit != resource.RLIM_INFINITY else ''}before launching")
    code = err.errno if isinstance(err, OSError) else None
    if code == errno.EFBIG:
        return os.strerror(code), too_large
    if code in (errno.ENOSPC, errno.EDQUOT):
        return os.strerror(code), room.replace("free space", "free space (or quota)") if code == errno.EDQUOT else room
    if code:
        return os.strerror(code), f"check {directory.parent} (its file system refused the write)"
    if limit != resource.RLIM_INFINITY and target is not None and target.exists() and target.stat().st_size >= limit:
        return f"File too large (the file-size limit, ulimit -f, is {limit} bytes)", too_large
    if free < (1 << 20):
        return os.strerror(errno.ENOSPC), room
    return f"the write failed ({str(err).strip().splitlines()[-1][:200]})", f"check {directory.parent}"


def _free_bytes(directory: Path) -> int:
    for path in (directory, *directory.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(path).free
    return 0


@contextlib.contextmanager
def _guarded(engine, writes: Writes) -> Iterator[None]:
    """DeepSpeed's writes of a checkpoint through `writes`: its checkpoint engine's `save` (every state file) and the
    recovery script rank 0 copies next to ZeRO's files (a plain `shutil.copyfile`)."""
    inner = engine.checkpoint_engine

    class Guarded:
        def save(self, state_dict, path):
            return writes(inner.save, state_dict, path)

        def __getattr__(self, name):
            return getattr(inner, name)

    copy = engine._copy_recovery_script
    engine.checkpoint_engine = Guarded()
    engine._copy_recovery_script = lambda path: writes(copy, path)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner
        del engine._copy_recovery_script  # the class's method again


def _first(failures: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Every rank's failure, gathered (a collective): the first, or None."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, failures[0])
    return next((f for f in everyone if f is not None), None)


def _settle(directory: Path, failure: dict[str, Any] | None, step: int) -> None:
    """Every rank, after the collective that told it `failure` (so every rank's writes are done): a save that failed
    somewhere stops here. Rank 0 removes the folder unless it was signed before the failure (a `latest` that could
    not be moved: the checkpoint is complete); `SaveFailed` on every rank."""
    if failure is None:
        return
    complete = damage(directory, content=False) is None
    if dist.get_rank() == 0 and not complete:
        shutil.rmtree(directory, ignore_errors=True)
    dist.barrier()
    root = directory.parent
    good = newest(root)
    kept = f"newest good checkpoint: {good} (step {read_manifest(good)['step']})" if good else "no checkpoint saved yet"
    removed = "" if complete else "; the partial folder is removed"
    raise SaveFailed(f"moe: checkpoint {directory.name} (step {step}) could not be written: {failure['cause']} "
                     f"(rank {failure['rank']}, {failure['file']}){removed}; {kept}; {failure['fix']}")


def _prune(root: Path, keep: int, current: str) -> None:
    """Delete complete checkpoints older than the newest `keep` up to `current` (the one just saved). Folders newer
    than `current` (left by a run that was resumed from an older checkpoint, e.g. past a corrupt one) are not
    counted and not deleted."""
    if keep <= 0:
        return
    complete = sorted(p for p in root.glob("step*") if (p / MANIFEST).exists() and p.name <= current)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def damage(directory: Path, content: bool = True) -> str | None:
    """Why this checkpoint cannot be used, or None when every file of its manifest is there with its size and (with
    `content`, and a manifest that records them) its digest. `content=False` checks sizes only (no file is read)."""
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        return f"{directory} has no {MANIFEST}: it was never completed"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return f"{manifest_path} is not valid JSON"
    for name, size in manifest["files"].items():
        path = directory / name
        if not path.exists():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is {path.stat().st_size} bytes, the manifest says {size}: truncated or overwritten"
    if content:
        for name, digest in manifest.get("digests", {}).items():
            if file_digest(directory / name) != digest:
                return f"{directory / name} does not match its SHA-256 in the manifest: its content is corrupt"
    return None


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST).read_text())


def tags(root: Path) -> list[Path]:
    """Every checkpoint folder under `root` (complete or not), newest first."""
    return sorted((p for p in root.glob("step*") if p.is_dir()), reverse=True)


def newest_intact(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under `root` that is intact (`damage`), found by scanning, not by `latest`; and one
    note per newer checkpoint skipped, saying why."""
    notes = []
    for candidate in tags(root):
        problem = damage(candidate)
        if problem is None:
            return candidate, notes
        notes.append(f"skipping damaged checkpoint: {problem}")
    return None, notes


def model_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`model.FIELD saved -> current` for every model field both name and that differs (a field the schema gained
    since the save is not a difference)."""
    return [f"model.{k} {saved[k]!r} -> {current[k]!r}" for k in sorted(set(saved) & set(current))
            if saved[k] != current[k]]


def layout_changes(manifest: dict[str, Any], layout: dict[str, Any], zero_stage: int | None = None) -> list[str]:
    """`tp 2 -> 1`, ... for every size, the expert backend and the ZeRO stage that differ between the checkpoint's
    manifest and this run (none: DeepSpeed's own files resume it; any: its portable states, `reshard`)."""
    saved = {"moe_backend": "legacy", **manifest["layout"]}  # written before the AutoEP backend existed: legacy
    changes = [f"{k} {saved[k]} -> {layout[k]}" for k in ("tp", "pp", "ep", "dp", "moe_backend")
               if saved[k] != layout.get(k, "legacy")]
    if zero_stage is not None and manifest.get("zero_stage") not in (None, zero_stage):
        changes.append(f"ZeRO stage {manifest['zero_stage']} -> {zero_stage}")
    return changes


def find_resume(root: Path, resume: str, layout: dict[str, int], model: dict[str, Any] | None = None,
                zero_stage: int | None = None) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (None: start fresh) and notes to show. Raises RecipeError on bad input: no
    intact checkpoint where there are some, another layout (or ZeRO stage) where the checkpoint has no portable
    states, another model (`model`: the recipe's model section, compared with the one the manifest recorded)."""
    warnings: list[str] = []
    if resume == "never":
        return None, warnings
    if resume == "auto":
        if not tags(root):
            return None, warnings
        chosen, warnings = newest_intact(root)
        if chosen is None:
            raise RecipeError("train.resume", (f"no intact checkpoint under {root} ({'; '.join(warnings)}); start "
                                               "over with --set train.overwrite=true (archives this run) or choose "
                                               "another train.output_dir"))
        pointer = root / POINTER
        named = pointer.read_text().strip() if pointer.exists() else None
        if named is None or not (root / named).is_dir() or named < chosen.name:  # newer: skipped, said above
            warnings.append(f"{pointer} {'names ' + named if named else 'is missing'}; the newest intact checkpoint "
                            f"found by scanning is {chosen.name}")
    else:
        chosen = Path(resume)
        problem = damage(chosen)
        if problem:
            raise RecipeError("train.resume", f"{problem}; pick another checkpoint or use resume: auto")
    manifest = read_manifest(chosen)
    changes = layout_changes(manifest, layout, zero_stage)
    if changes and not manifest.get("portable"):
        raise RecipeError("train.resume", (f"{chosen} was written with another layout ({', '.join(changes)}) and "
                                           "without portable states (train.portable_checkpoints: false, or written "
                                           "before they existed): resume with the saved layout, or export it (moe "
                                           "export) and start a new run from it (train.init_from)"))
    saved_model = manifest.get("model")
    run_file = root.parent / "run.json"  # checkpoints saved before manifests held the model: the run's own recipe
    if saved_model is None and chosen.parent == root and run_file.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            saved_model = json.loads(run_file.read_text())["recipe"]["model"]
    if model is not None and saved_model is not None:
        changed = model_differences(saved_model, model)
        if changed:
            raise RecipeError("model", (f"{chosen} holds another model ({', '.join(changed)}); resume with the saved "
                                        "model, or start a new run: another train.output_dir, or --set "
                                        "train.overwrite=true (archives this run)"))
    return chosen, warnings


def load(engine, directory: Path) -> int:
    """Restore model, optimizer, scheduler (and loss scale) through DeepSpeed, then this rank's RNG. Returns the step."""
    _, client_state = engine.load_checkpoint(str(directory.parent), tag=directory.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise RecipeError("train.resume", f"DeepSpeed could not load {directory}")
    rng = torch.load(directory / f"rng_rank{dist.get_rank()}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return int(client_state["step"])


def newest(root: Path) -> Path | None:
    """The newest complete checkpoint (manifest there, every file with its size; contents not read), by scanning."""
    return next((p for p in tags(root) if damage(p, content=False) is None), None)


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop metrics logged after the checkpoint a run resumes from: those steps run again."""
    if not path.exists():
        return
    kept = [line for line, record in read_metrics_lines(path) if record["step"] <= last_step]  # a torn last line goes
    _write_atomic(path, "".join(line + "\n" for line in kept))
