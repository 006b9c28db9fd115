"""`moe export RUN_DIR OUT_DIR`: a DeepSpeed MoE (+ pipeline, + tensor-parallel) checkpoint -> a Hugging Face folder.

No process group and no GPU: the files are read directly, using the checkpoint's manifest (which DeepSpeed
model-parallel file holds which pipeline stage and tp slice) and the run's recipe:

- pipeline files key parameters by the PipelineModule's layer index: 0 = embedding, 1..L = decoder layers,
  L+1 = final norm and LM head; pp = 1 files already use the model's own names;
- DeepSpeed's MoE layer stores the router as `mlp.moe.deepspeed_moe.gate.wg.weight` and each expert in a file of its
  own under its global id (`...deepspeed_experts.<id>.<name>`): experts are stacked back into `[E, ...]` tensors;
- tensor-parallel q/k/v are concatenated by output rows and o by input columns over the tp ranks; everything else is
  replicated over tp and taken from tp rank 0;
- AutoEP stores the router as `mlp.moe.router.gate.weight` and each expert's gate, up and down matrices in the same
  per-expert files (`...mlp.moe.experts.w1.<id>`, `w3`, `w2`); they are stacked, then renamed and fused back into
  the block's (`parallel.autoep.block_state`);
- ZeRO-3 checkpoints (the module files hold no weights) are read whole through DeepSpeed's universal checkpoint
  conversion (`universal`): the fp32 master weights. (That conversion refuses pipeline checkpoints of AutoEP,
  whose expert files repeat per stage, which is why the files above are read directly.)

`native` writes `MoEForCausalLM` (safetensors + config + the model code for trust_remote_code); `mixtral` writes
transformers' own `MixtralForCausalLM` (silu experts only: the parameter sets are identical).
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..configuration import MoEConfig
from ..errors import UserError
from ..formats import FAMILIES, block_settings_set, family_weights_config, save_family
from ..recipe import ModelSection
from ..parallel.state_dict_adapter import LEGACY_EXPERT as EXPERT_KEY
from ..parallel.state_dict_adapter import TP_ROWS, is_state_buffer
from ..parallel.state_dict_adapter import global_name as hf_key
from . import checkpoint, universal

# the legacy layer's expert keys (`parallel.state_dict_adapter.LEGACY_EXPERT`); its files number experts globally
AUTOEP_EXPERT_KEY = re.compile(r"(?P<prefix>.*\.mlp\.moe\.experts)\.(?P<name>w[123])\.(?P<id>\d+)$")


class ExportError(UserError):
    """A run folder, checkpoint or format that cannot be exported; `str()` is `WHAT: why`, the one line shown."""

    def __init__(self, what: str, message: str):
        self.field, self.message = what, message
        super().__init__(f"{what}: {message}")


def merged_state_dict(directory: Path, config: MoEConfig, scratch: Path | None = None) -> dict[str, torch.Tensor]:
    """The single-device model's state dict from one checkpoint tag. A universal conversion, where needed, writes
    its temporary folder inside `scratch` (default: the checkpoint's parent)."""
    manifest = checkpoint.read_manifest(directory)
    layout = manifest["layout"]
    pipelined, L = layout["pp"] > 1, config.num_hidden_layers
    from ..parallel.autoep import block_state

    if universal.needs_universal(directory):
        try:
            with universal.converted(directory, scratch or directory.parent) as folder:
                states = universal.read_states(folder, universal.param_shapes(directory))
        except RuntimeError as err:
            raise ExportError("checkpoint", str(err)) from None
        return block_state({hf_key(k, pipelined, L): v for k, v in {**states, **zero3_buffers(directory)}.items()})
    slices: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)

    def place(key: str, tensor: torch.Tensor, tp_rank: int) -> None:
        match = EXPERT_KEY.match(hf_key(key, pipelined, L))
        autoep = AUTOEP_EXPERT_KEY.match(hf_key(key, pipelined, L))
        if match:
            experts[(f"{match['prefix']}.mlp.experts", match["name"])][int(match["id"])] = tensor
        elif autoep:
            experts[(autoep["prefix"], autoep["name"])][int(autoep["id"])] = tensor
        else:
            slices[hf_key(key, pipelined, L)][tp_rank] = tensor

    for mp, where in manifest["model_parallel_files"].items():
        states = torch.load(directory / f"mp_rank_{int(mp):02d}_model_states.pt", map_location="cpu", weights_only=False)
        for key, tensor in states["module"].items():
            place(key, tensor, where["tp"])
    for path in sorted(directory.glob("*expert_*_mp_rank_*_model_states.pt")):
        for key, tensor in torch.load(path, map_location="cpu", weights_only=False).items():
            place(key, tensor, 0)

    state: dict[str, torch.Tensor] = {}
    for key, by_rank in slices.items():
        ranks = [by_rank[r] for r in sorted(by_rank)]
        proj = key.rsplit(".", 2)[-2]
        if len(ranks) > 1 and proj in TP_ROWS:
            state[key] = torch.cat(ranks, dim=0)
        elif len(ranks) > 1 and proj == "o_proj":
            state[key] = torch.cat(ranks, dim=1)
        else:
            state[key] = ranks[0]
    for (prefix, name), by_id in experts.items():
        if sorted(by_id) != list(range(config.num_local_experts)):
            raise ExportError("checkpoint", f"{directory}: {prefix} has experts {sorted(by_id)}, expected "
                                            f"0..{config.num_local_experts - 1}")
        state[f"{prefix}.{name}"] = torch.stack([by_id[e] for e in range(config.num_local_experts)])
    return block_state(state)


def zero3_buffers(directory: Path) -> dict[str, torch.Tensor]:
    """The state buffers (`STATE_BUFFERS`: the score bias) of a ZeRO-3 checkpoint, which the universal conversion
    leaves out (it joins the optimizer's partitions): every rank's module file holds them whole; the first rank of
    each pipeline stage's files is read."""
    found: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("zero_pp_rank_0_mp_rank_*_model_states.pt")):
        module = torch.load(path, map_location="cpu", weights_only=False).get("module") or {}
        found.update({k: v for k, v in module.items() if is_state_buffer(k)})
    return found


@dataclass
class Exported:
    folder: Path  # the Hugging Face folder written
    checkpoint: Path  # the checkpoint it was read from
    step: int  # that checkpoint's step
    format: str  # the format written (`--format hub` resolved to the family the run started from)


def export(run_dir: Path, out_dir: Path, fmt: str = "native", tag: str | None = None,
           skipped: list[str] | None = None) -> Exported:
    """Write the newest intact checkpoint of `run_dir` (or `tag`) as a Hugging Face folder.

    Without `tag` the checkpoint folders are scanned (`checkpoint.newest_intact`: sizes and SHA-256 digests, not
    the `latest` pointer); each newer one passed over is appended to `skipped` (one line each, saying why). A live
    run's rotation may delete the chosen checkpoint while it is read: the next intact one is taken then, and said."""
    from .. import MoEForCausalLM

    run_file = run_dir / "run.json"
    if not run_file.exists():
        raise ExportError("RUN_DIR", f"{run_dir} has no run.json: pass the output_dir of a training run")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError("OUT_DIR", f"{out_dir} is a file, not a folder; choose a new folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError("OUT_DIR", f"{out_dir} exists and is not empty; choose a new folder")
    notes = skipped if skipped is not None else []
    root = run_dir / "checkpoints"
    for _ in range(len(checkpoint.tags(root)) + 1):
        directory = _chosen(run_dir, root, tag, notes)
        try:
            # the model the checkpoint was written with (its manifest, since the model-check issue), else the recipe
            manifest = checkpoint.read_manifest(directory)
            config = ModelSection(**(manifest.get("model") or json.loads(run_file.read_text())["recipe"]["model"])
                                  ).to_config()
            fmt = _checked_format(fmt, config, run_file)
            state = merged_state_dict(directory, config, scratch=out_dir.parent)
            break
        except FileNotFoundError as err:  # removed after it was chosen: a live run's rotation (keep_checkpoints)
            if tag:
                raise ExportError("checkpoint", f"{directory} lost {Path(err.filename or '?').name} while it was "
                                                "read; export another tag with --tag") from None
            notes.append(f"skipping {directory.name}: removed while it was read (the run's keep_checkpoints rotation)")
    else:
        raise ExportError("RUN_DIR", f"{run_dir}: every checkpoint was removed while it was read; try again")

    model = MoEForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ExportError("checkpoint", f"{directory} does not match the run's model: missing {missing[:3]}, "
                                        f"unexpected {unexpected[:3]}")
    if fmt == "mixtral":
        model = to_mixtral(model)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if fmt in FAMILIES:
        save_family(model, staging, fmt)  # through transformers' own class of the family (its Hub layout)
    else:
        model.save_pretrained(staging)
    tokenizer = run_dir / "tokenizer"
    if tokenizer.is_dir():
        for path in tokenizer.iterdir():
            shutil.copy2(path, staging / path.name)
    if out_dir.exists():
        out_dir.rmdir()
    staging.rename(out_dir)  # the folder appears whole or not at all
    return Exported(out_dir, directory, int(manifest["step"]), fmt)


def _checked_format(fmt: str, config: MoEConfig, run_file: Path) -> str:
    """`fmt` with `hub` resolved to the model_type of the run's `train.init_from` folder, once it is known that the
    format can hold this model (else an `ExportError` naming the setting it cannot)."""
    if fmt == "hub":
        folder = (json.loads(run_file.read_text())["recipe"].get("train") or {}).get("init_from")
        try:
            kind = json.loads((Path(folder) / "config.json").read_text())["model_type"] if folder else None
        except (OSError, ValueError, KeyError):
            kind = None
        if kind is None:
            raise ExportError("--format", ("hub writes the format of the run's train.init_from folder, and "
                                           + (f"{folder} is unreadable" if folder else "this run has none")
                                           + "; name the format (--format native, mixtral or a family)"))
        fmt = "native" if kind == MoEConfig.model_type else kind
    if fmt == "mixtral" and config.hidden_act != "silu":
        raise ExportError("--format", "mixtral needs silu (gated) experts; this model's are gelu: use --format native")
    if fmt == "mixtral" and block_settings_set(config):
        raise ExportError("--format", f"mixtral cannot hold {', '.join(block_settings_set(config))}; use --format "
                                      "native or the family the blocks come from")
    if fmt in FAMILIES:
        try:
            family_weights_config(fmt, config)
        except ValueError as err:
            raise ExportError("--format", f"{err}; use --format native") from None
    return fmt


def _chosen(run_dir: Path, root: Path, tag: str | None, notes: list[str]) -> Path:
    """The checkpoint to export: `tag`'s (refused if damaged) or the newest intact one."""
    if tag:
        directory = root / tag
        problem = checkpoint.damage(directory)
        if problem:
            raise ExportError("checkpoint", f"{problem}; export another tag with --tag")
        return directory
    directory, damaged = checkpoint.newest_intact(root)
    notes.extend(damaged)
    if directory is None and damaged:
        raise ExportError("RUN_DIR", f"{run_dir} has no intact checkpoint ({'; '.join(damaged)})")
    if directory is None:
        raise ExportError("RUN_DIR", (f"{run_dir} has no complete checkpoint (a run writes one at its last "
                                      "step unless train.save_last is false, and every train.save_every steps)"))
    return directory


def to_mixtral(model):
    from transformers import MixtralForCausalLM

    from ..formats import mixtral_config

    mixtral = MixtralForCausalLM(mixtral_config(model.config, model.dtype))
    mixtral.load_state_dict(model.state_dict(), strict=True)
    return mixtral
