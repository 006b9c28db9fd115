"""Checkpoints any layout can resume: every rank's states by global name and slice, read back into another layout.

DeepSpeed's own checkpoint (`engine.save_checkpoint`) is in the writing layout's terms: ZeRO partitions of flat
buffers, the legacy layer's per-expert files, pipeline layer indices, and it resumes that layout only. Its universal
checkpoint (`deepspeed.checkpoint.ds_to_universal`, then `checkpoint.load_universal`) re-partitions ZeRO states but,
in DeepSpeed 0.19, refuses pipeline AutoEP checkpoints ("Multi-mp_rank expert files are not yet supported"), skips
the legacy layer's experts ("assuming native DeepSpeed MoE and skipping"), has no path for ZeRO-0, and loads by the
module's own parameter names, which the pipeline (layer indices), the legacy layer (`deepspeed_experts.<i>`) and
AutoEP (`w1`/`w3`/`w2`) each spell differently. So a checkpoint also carries its states free of the layout:

    portable_rank<r>_<k>.safetensors   pieces `<state>|<global name>|<spans>` (`state_dict_adapter.piece_key`): the
                                       fp32 master weights (`fp32`) and both Adam moments (`exp_avg`, `exp_avg_sq`) of
                                       the slice of each single-device parameter this rank holds (`shard_of`), and the
                                       state buffers (the score bias) as `fp32`; a slice
                                       held by several ranks (data-parallel copies) is written once, by the lowest
    portable_state.json                the optimizer's step count, the lr scheduler's state, the engine's counters

DeepSpeed's own accessors read and write the full states of a rank's parameter (`deepspeed.utils.
safe_get_full_fp32_param`, `safe_get_full_optimizer_state` and their `safe_set_*`), on ZeRO 1-3 and the bf16
optimizer; without them (fp32 at ZeRO-0) the torch optimizer steps the parameters themselves and holds their state.

Resuming on another layout (`load`): each rank builds its share from the `fp32` pieces (`engine.weights_source`),
`deepspeed.initialize` partitions it, and `load` writes the master weights, both moments of every parameter (every
expert's included) and the step counts into the new partitions. The data position is the step: batches are
addressed by global sample index. RNG states are per rank and do not carry over; training draws no random numbers
(no dropout), so nothing depends on them.

Cost: a save writes about 12 more bytes per parameter and, under ZeRO 1-3, gathers each parameter's full states
over its data-parallel group (DeepSpeed's accessors are collectives), one parameter at a time: the accelerator holds
one parameter's three full states at once, the host up to `CHUNK_BYTES` of pieces before they are written.
`train.portable_checkpoints: false` leaves the pieces out, and with them resuming on another layout.
"""

from __future__ import annotations

import json
from math import prod
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..parallel.layout import Layout
from ..parallel.state_dict_adapter import (PieceSource, global_shapes, is_state_buffer, piece_key, rank_shards,
                                           region, state_buffers)

STATES = ("fp32", "exp_avg", "exp_avg_sq")
MOMENTS = STATES[1:]
STATE_FILE = "portable_state.json"
PIECES_GLOB = "portable_rank*.safetensors"
CHUNK_BYTES = 1 << 30  # a rank's pieces go to files of about this size: never all of its states in memory at once


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that steps (inside DeepSpeed's ZeRO and bf16 wrappers, or the engine's own)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _managed(param) -> bool:
    """Whether DeepSpeed's full-state accessors serve `param` (ZeRO 1-3, the bf16 optimizer)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def serves(engine) -> bool:
    """Whether this engine's states can be written as pieces: DeepSpeed's accessors serve every parameter (ZeRO 1-3,
    the bf16 optimizer), or the torch optimizer steps the parameters themselves (fp32 at ZeRO-0). Not fp16 without
    ZeRO, whose optimizer keeps its fp32 masters in flat groups no accessor reads."""
    stepped = {id(p) for group in base_optimizer(engine).param_groups for p in group["params"]}
    return all(_managed(p) or id(p) in stepped for p in engine.module.parameters())


def link_fragments(engine) -> None:
    """Point every parameter's fragment (ZeRO 1-2, the bf16 optimizer) at its flat partition's optimizer states,
    which DeepSpeed's full-state accessors read. Why by hand: ZeRO 1-2 link them once, right after stepping the first
    parameter group (`_optimizer_step` steps one group at a time), while the later groups have no state yet, and
    never again: their fragments stay empty and `safe_get_full_optimizer_state` fails for them (DeepSpeed 0.19)."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    wrapper = engine.optimizer
    for low, high in (("bit16_groups", "single_partition_of_fp32_groups"), ("bf16_groups", "fp32_groups_flat_partition")):
        if hasattr(wrapper, low):
            for params, flat in zip(getattr(wrapper, low), getattr(wrapper, high)):
                if flat in wrapper.optimizer.state:
                    lazy_init_hp_params_optimizer_state(params, flat, wrapper.optimizer.state)


def full_states(engine, param) -> dict[str, torch.Tensor]:
    """`param`'s fp32 master weights and Adam moments, whole (this rank's parameter, not its ZeRO partition). Under
    ZeRO a collective over the parameter's data-parallel group."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    shape = getattr(param, "ds_shape", param.shape)
    if _managed(param):
        states = {"fp32": safe_get_full_fp32_param(param)}
        states.update({key: safe_get_full_optimizer_state(param, key) for key in MOMENTS})
        return {key: value.reshape(shape) for key, value in states.items()}
    state = base_optimizer(engine).state.get(param)
    if state is None or "exp_avg" not in state:
        raise RuntimeError(f"the optimizer holds no Adam state for a parameter of shape {tuple(shape)}: "
                           "portable checkpoints need DeepSpeed's ZeRO/bf16 optimizer or torch's Adam(W)")
    return {"fp32": param.detach().float(), "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}


def optimizer_step(engine) -> int:
    """Adam's step count (its bias correction): the same for every state the optimizer holds."""
    steps = {int(state["step"]) for state in base_optimizer(engine).state.values() if "step" in state}
    if len(steps) != 1:
        raise RuntimeError(f"the optimizer's states disagree on the step count: {sorted(steps)}")
    return steps.pop()


class _Pieces:
    """A rank's pieces, written to `portable_rank<r>_<k>.safetensors` files of about `CHUNK_BYTES` each, through
    `write` (`checkpoint.Writes`: a failed write is kept for the save's verdict, the collectives go on)."""

    def __init__(self, directory: Path, rank: int, write=None):
        self.directory, self.rank, self.files = directory, rank, 0
        self.write = write or (lambda fn, *args: fn(*args))
        self.pending: dict[str, torch.Tensor] = {}
        self.bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.pending[key] = tensor.detach().to("cpu", torch.float32, copy=True).contiguous()  # off the accelerator
        self.bytes += tensor.numel() * 4
        if self.bytes >= CHUNK_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if self.pending:
            self.write(save_file, self.pending,
                       str(self.directory / f"portable_rank{self.rank:05d}_{self.files:03d}.safetensors"))
            self.files += 1
        self.pending, self.bytes = {}, 0


def save(engine, directory: Path, layout: Layout, config, step: int, write=None) -> None:
    """Every rank, after `engine.save_checkpoint` into `directory`: write this rank's pieces, and (rank 0) the step
    counts and the scheduler's state; every file through `write(fn, *args)` when given (`checkpoint.Writes`)."""
    rank = dist.get_rank()
    shapes = global_shapes(config)
    shards = rank_shards(engine.module, layout, config, rank)
    keys = {}
    for name, shard in shards.items():
        spans, _ = region(shard.index, shapes[shard.name])
        keys[name] = (shard.name, spans)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted({piece_key("", *key) for key in keys.values()}))
    owner: dict[str, int] = {}
    for r, held in enumerate(everyone):
        for key in held:
            owner.setdefault(key, r)
    pieces = _Pieces(directory, rank, write)
    link_fragments(engine)
    for name, param in engine.module.named_parameters():  # every rank of a group in the same order: collectives
        states = full_states(engine, param)
        if owner[piece_key("", *keys[name])] != rank:
            continue
        shape = [b - a for a, b in keys[name][1]]
        for state, tensor in states.items():
            pieces.add(piece_key(state, *keys[name]), tensor.reshape(shape))
    for name, buffer in state_buffers(engine.module):  # no optimizer state: the value alone
        if owner[piece_key("", *keys[name])] == rank:
            pieces.add(piece_key("fp32", *keys[name]), buffer)
    pieces.flush()
    optimizer_steps = optimizer_step(engine)
    if rank == 0:
        scheduler = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
        pieces.write(Path.write_text, directory / STATE_FILE, json.dumps({
            "step": step, "optimizer_step": optimizer_steps, "lr_scheduler": scheduler,
            "global_steps": engine.global_steps, "global_samples": engine.global_samples,
            "skipped_steps": engine.skipped_steps}, indent=2))


def has_pieces(directory: Path) -> bool:
    return (directory / STATE_FILE).is_file()


def sources(directory: Path, config, states: tuple[str, ...] = STATES) -> dict[str, PieceSource]:
    """One `PieceSource` per state over the checkpoint's pieces (the weights of a build: `sources(...)["fp32"]`)."""
    files = sorted(directory.glob(PIECES_GLOB))
    shapes = global_shapes(config)
    moments = {name: shape for name, shape in shapes.items() if not is_state_buffer(name)}
    return {state: PieceSource(files, state, shapes if state == "fp32" else moments) for state in states}


def problem(directory: Path, config) -> str | None:
    """What keeps the checkpoint's pieces from filling every parameter of `config`'s model (one line), or None.
    Headers only: each state's pieces of a parameter must hold all its values (pieces never overlap)."""
    if not has_pieces(directory):
        return f"it has no {STATE_FILE} (saved with train.portable_checkpoints: false, or before portable states existed)"
    for state, source in sources(directory, config).items():
        for name, shape in source.shapes.items():
            held = sum(prod(b - a for a, b in spans) for spans, _, _ in source.pieces.get(name, []))
            if held != shape.numel():
                return (f"its {state} pieces hold {held} of the {shape.numel()} values of {name} (a rank's piece is "
                        "missing, or the checkpoint holds another model)")
    return None


def _stepped_tensors(engine) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """(tensor, its param group) for every tensor the torch optimizer steps. ZeRO-3 hands its flat fp32 partitions
    to the optimizer's groups only while stepping them (`_optimizer_step`), so they are taken from it."""
    optimizer = base_optimizer(engine)
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flats is not None:
        return [(flat, optimizer.param_groups[engine.optimizer.sub_group_to_group_id[i]]) for i, flat in enumerate(flats)]
    return [(p, group) for group in optimizer.param_groups for p in group["params"]]


def _ensure_adam_state(engine, step: int) -> None:
    """Give every tensor the optimizer steps an Adam state at `step` (torch's AdamW creates it lazily, at the first
    step, as these tensors: a float32 step, on the parameter's device where fused or capturable)."""
    optimizer = base_optimizer(engine)
    for p, group in _stepped_tensors(engine):
        on_device = group.get("fused") or group.get("capturable")
        state = optimizer.state[p]
        state.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
        state.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu")


def load(engine, directory: Path, layout: Layout, config) -> int:
    """Write a checkpoint's pieces (another layout's) into this engine, whose weights were built from them: master
    weights, both Adam moments and step counts, the scheduler, the engine's counters. Returns the step to continue
    after. A parameter the pieces do not cover is a `LookupError` naming it."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    saved = json.loads((directory / STATE_FILE).read_text())
    optimizer = base_optimizer(engine)
    _ensure_adam_state(engine, saved["optimizer_step"])
    link_fragments(engine)  # as DeepSpeed's universal loader does (`load_hp_checkpoint_state_from_checkpoint_dir`)
    read = sources(directory, config)
    shards = rank_shards(engine.module, layout, config, dist.get_rank())
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            shard = shards[name]
            shape = getattr(param, "ds_shape", param.shape)
            values = {state: read[state].read(shard.name, shard.index).reshape(shape) for state in STATES}
            if _managed(param):
                safe_set_full_fp32_param(param, values["fp32"])
                for key in MOMENTS:
                    safe_set_full_optimizer_state(param, values[key], key)
            else:
                param.copy_(values["fp32"])
                for key in MOMENTS:
                    optimizer.state[param][key].copy_(values[key])
        for name, buffer in state_buffers(engine.module):  # built from the pieces, then cast by the engine
            buffer.copy_(read["fp32"].read(shards[name].name, ()))
    if engine.lr_scheduler is not None and saved["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        # DeepSpeed's schedulers set the groups' lr for an iteration in `step(n)` (torch's optimizer state, which
        # DeepSpeed's own resume restores, would carry it otherwise)
        engine.lr_scheduler.step(saved["lr_scheduler"]["last_batch_iteration"])
    engine.global_steps, engine.global_samples = saved["global_steps"], saved["global_samples"]
    engine.skipped_steps = saved["skipped_steps"]
    return int(saved["step"])
