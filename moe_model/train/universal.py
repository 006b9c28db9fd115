"""A run's checkpoint as DeepSpeed's universal checkpoint: how this project reads ZeRO-3 and AutoEP states whole.

DeepSpeed's `deepspeed.checkpoint.ds_to_universal` joins every parameter's ZeRO partitions (stage 1-3), merges
tensor-parallel slices and gathers AutoEP's experts from every expert-parallel rank into `[E, ...]` tensors, then
writes one folder per parameter, `zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt` (fp32 master weights and both Adam
moments), under the module's own parameter names. DeepSpeed's legacy MoE experts are not consolidated by it ("native
DeepSpeed MoE ... skipping"): legacy checkpoints at ZeRO 0-2 keep their direct reader (`export.merged_state_dict`).

The conversion writes every state of every parameter (about 12 bytes per parameter) into a temporary folder next to
where the caller asks, and removes it afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

STATES = ("fp32", "exp_avg", "exp_avg_sq")


def needs_universal(directory: Path) -> bool:
    """Whether this checkpoint's weights are only readable whole through the universal conversion: ZeRO-3, whose
    module files (DeepSpeed names them `zero_pp_rank_*_model_states.pt`) hold no weights."""
    return any(directory.glob("zero_pp_rank_*_mp_rank_*_model_states.pt"))


@contextlib.contextmanager
def converted(directory: Path, near: Path) -> Iterator[Path]:
    """`directory` (one checkpoint tag) converted into a temporary universal folder created inside `near`; removed
    when the block ends. Raises RuntimeError with DeepSpeed's last output line when the conversion fails."""
    from deepspeed.checkpoint import ds_to_universal

    near.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".universal-", dir=near))
    args = argparse.Namespace(input_folder=str(directory), output_folder=str(scratch / "universal"),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    log = io.StringIO()
    try:
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                ds_to_universal.main(args)
        except Exception as err:
            last = (log.getvalue().strip().splitlines() or [""])[-1]
            raise RuntimeError(f"DeepSpeed's universal conversion of {directory} failed: {err} {last}".strip()) from err
        yield scratch / "universal"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def param_shapes(directory: Path) -> dict[str, torch.Size]:
    """Every parameter's shape as the checkpoint's module files record it (DeepSpeed's `param_shapes`, one mapping
    per optimizer group): the universal conversion of ZeRO-3 writes dense parameters flat."""
    shapes: dict[str, torch.Size] = {}
    for path in sorted(directory.glob("*model_states.pt")):
        if "expert_" in path.name:
            continue
        for group in torch.load(path, map_location="cpu", weights_only=False).get("param_shapes") or []:
            shapes.update({name: torch.Size(shape) for name, shape in group.items()})
    return shapes


def read_states(universal_dir: Path, shapes: dict[str, torch.Size], state: str = "fp32") -> dict[str, torch.Tensor]:
    """Every parameter's `state` (one of `STATES`) from a universal folder, by the module's parameter name; a flat
    tensor is given its recorded shape from `shapes` (`param_shapes`) where the sizes agree (experts are written
    whole, [E, ...], and keep theirs)."""
    tensors = {}
    for folder in sorted((universal_dir / "zero").iterdir()):
        path = folder / f"{state}.pt"
        if not path.is_file():
            continue
        saved = torch.load(path, map_location="cpu", weights_only=False)
        tensor = (saved["param"] if isinstance(saved, dict) else saved).detach()
        shape = shapes.get(folder.name)
        if tensor.ndim == 1 and shape is not None and len(shape) > 1 and tensor.numel() == shape.numel():
            tensor = tensor.view(shape)
        tensors[folder.name] = tensor
    return tensors
