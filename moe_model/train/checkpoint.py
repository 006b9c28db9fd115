"""Checkpoints that are complete or invisible, and exact resume.

Layout under `OUTPUT_DIR/checkpoints/`:

    step00000010/            DeepSpeed's own files (model, ZeRO optimizer, expert files), plus
        rng_rank<r>.pt       each rank's RNG state and data position
        manifest.json        written by rank 0 after every rank has written: files and sizes, step, layout
    latest                   the tag of the newest complete checkpoint, replaced atomically after the manifest

A checkpoint counts only once `latest` names it, so a crash mid-save leaves the previous one as the newest. On
resume every file in the manifest must exist with its recorded size; a truncated or missing file makes that
checkpoint damaged: `resume: auto` falls back to the newest intact one (saying so), an explicit path is refused.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..metrics_file import read_metrics_lines
from ..parallel.layout import Layout
from ..recipe import RecipeError

MANIFEST = "manifest.json"
POINTER = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, root: Path, step: int, layout: dict[str, int], keep: int) -> Path:
    """Every rank calls this at the same step. Returns the checkpoint directory."""
    tag = tag_for(step)
    rank = dist.get_rank()
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    directory = root / tag
    torch.save({"step": step, "torch": torch.get_rng_state(), "python": random.getstate()},
               directory / f"rng_rank{rank}.pt")
    # which DeepSpeed model-parallel file (mp_rank_XX) holds which pipeline stage and tensor-parallel slice
    coords = Layout(**layout).coords(rank)
    mine = torch.tensor([engine.mpu.get_model_parallel_rank() if engine.mpu is not None else 0,
                         coords["pipe"], coords["model"]])
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.name != MANIFEST}
        mp_files = {int(m): {"pipe": int(pp), "tp": int(tp)} for m, pp, tp in (t.tolist() for t in everyone)}
        manifest = {"step": step, "layout": layout, "files": files, "model_parallel_files": mp_files}
        _write_atomic(directory / MANIFEST, json.dumps(manifest, indent=2))
        _write_atomic(root / POINTER, tag)
        _prune(root, keep)
    dist.barrier()
    return directory


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    complete = sorted(p for p in root.glob("step*") if (p / MANIFEST).exists())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def damage(directory: Path) -> str | None:
    """Why this checkpoint cannot be used, or None when every file of its manifest is there with its size."""
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
    return None


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST).read_text())


def find_resume(root: Path, resume: str, layout: dict[str, int]) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (None: start fresh) and warnings to show. Raises RecipeError on bad input."""
    warnings: list[str] = []
    if resume == "never":
        return None, warnings
    if resume == "auto":
        pointer = root / POINTER
        if not pointer.exists():
            return None, warnings
        newest = root / pointer.read_text().strip()
        candidates = [newest] + sorted((p for p in root.glob("step*") if p != newest and p.name < newest.name),
                                       reverse=True)
        chosen = None
        for candidate in candidates:
            problem = damage(candidate)
            if problem is None:
                chosen = candidate
                break
            warnings.append(f"skipping damaged checkpoint: {problem}")
        if chosen is None:
            raise RecipeError("train.resume", f"no intact checkpoint under {root}; use resume: never to start over")
    else:
        chosen = Path(resume)
        problem = damage(chosen)
        if problem:
            raise RecipeError("train.resume", f"{problem}; pick another checkpoint or use resume: auto")
    saved = read_manifest(chosen)["layout"]
    differ = [f"{k} {saved[k]} -> {layout[k]}" for k in ("tp", "pp", "ep", "dp") if saved[k] != layout[k]]
    if differ:
        raise RecipeError("train.resume", (f"{chosen} was written with another layout ({', '.join(differ)}); "
                                           "DeepSpeed cannot reshard MoE + pipeline checkpoints: resume with the "
                                           "saved layout, or export it (moe export) and start a new run"))
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
    pointer = root / POINTER
    return root / pointer.read_text().strip() if pointer.exists() else None


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop metrics logged after the checkpoint a run resumes from: those steps run again."""
    if not path.exists():
        return
    kept = [line for line, record in read_metrics_lines(path) if record["step"] <= last_step]  # a torn last line goes
    _write_atomic(path, "".join(line + "\n" for line in kept))
