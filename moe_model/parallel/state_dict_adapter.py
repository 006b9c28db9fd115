"""Which part of the single-device model each parameter of this rank's parallel module holds, and filling it.

The parallel module (`build_model`: tensor-parallel attention, pipeline stages, DeepSpeed's legacy MoE layer or the
AutoEP block, before `deepspeed.initialize`) is built on the meta device and only this rank's parameters are then
allocated and filled, each from a `Source` read by the single-device model's parameter name (the native and the
Mixtral checkpoint names are the same) and the slice this rank holds:

    local name                                                  global name                     part
    <i>.embed_tokens.weight, <i>.layer.<rest>, <i>.norm/lm_head   model.<...>, model.layers.<i-1>.<rest>, ...  (pp > 1)
    ...self_attn.{q,k,v}_proj.weight                            the same                        rows of tp rank
    ...self_attn.o_proj.weight                                  the same                        columns of tp rank
    ...mlp.moe.deepspeed_moe.gate.wg.weight                     ...mlp.gate.weight              all (legacy, ep > 1)
    ...mlp.moe.deepspeed_moe.gate.e_score_correction_bias       ...mlp.gate.e_score_correction_bias  all (legacy)
    ...mlp.moe.deepspeed_moe.experts.deepspeed_experts.<i>.<w>  ...mlp.experts.<w>              expert ep_rank*E/ep + i
    ...mlp.moe.<rest> (gate, experts, shared experts)           ...mlp.<rest>                   AutoEP: this rank's
                                                                                                experts only (AutoEP
                                                                                                copies no others)
    ...mlp.moe.router.gate.weight, router.e_score_correction_bias, shared_experts.*, shared_experts_gate.weight
                                                                ...mlp.<`autoep.block_name`>    all (AutoEP's layer)
    ...mlp.moe.experts.w1 / w3 / w2                             ...experts.gate_up_proj / down_proj  this rank's experts;
                                                                                                w1 the gate rows, w3 up

The one home of these names: `moe export` reads DeepSpeed checkpoints (whose keys are these local names) through
`global_name` too, and a checkpoint's layout-free pieces (`train.reshard`) are written and read by them. Sources:
`SeededInit` (the recipe's seed, one stream per parameter and per expert, so every layout gets the same weights
without any rank generating what it does not hold), `SafetensorsSource` (a Hugging Face folder, read lazily: only the
slices this rank holds leave the disk) and `PieceSource` (the pieces another layout's ranks wrote: any slice is
assembled from the pieces it overlaps).

Why by hand: torch's `distributed.checkpoint` and DTensor resharding address DTensor shards on a DeviceMesh, and
DeepSpeed's groups are plain process groups with its own module names; transformers' loading materializes whole
tensors per process.

Besides the parameters, the model has one state that no optimizer holds: the routers' score bias
(`e_score_correction_bias`, a buffer the aux-loss-free balance rule moves). It is named, read, filled and written
with the parameters (`state_tensors`), whole on every rank that holds its layer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..formats import HUB_EXPERT_LAYOUTS, hub_names, hub_parts, in_mtp_layer, mtp_layers
from .autoep import block_name

LEGACY_EXPERT = re.compile(r"(?P<prefix>.*)\.mlp\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(?P<id>\d+)\.(?P<name>\w+)$")
AUTOEP = re.compile(r"(?P<prefix>.*)\.mlp\.moe\.(?P<rest>.+)$")  # the AutoEP block, converted by DeepSpeed or not
AUTOEP_EXPERTS = ("experts.w1", "experts.w2", "experts.w3")  # the converted layer's: this rank's E/ep experts
TP_ROWS = ("q_proj", "k_proj", "v_proj", "q_b_proj", "kv_b_proj")  # (the last two: MLA's heads)
STATE_BUFFERS = ("e_score_correction_bias",)  # buffers that are model state (saved, resharded, exported)
LEGACY_GATE = re.compile(r"\.mlp\.moe\.deepspeed_moe\.gate\.(wg\.)?")  # the legacy layer's gate: weight and bias


def is_state_buffer(name: str) -> bool:
    """Whether a tensor's name (local, global or a checkpoint key) is a state buffer's (`STATE_BUFFERS`)."""
    return name.rsplit(".", 1)[-1] in STATE_BUFFERS


def state_buffers(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The buffers of `module` that are model state (`STATE_BUFFERS`), by local name."""
    for name, buffer in module.named_buffers():
        if is_state_buffer(name):
            yield name, buffer


def state_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter of `module`, then its state buffers: what a source fills and a checkpoint's pieces hold."""
    yield from module.named_parameters()
    yield from state_buffers(module)


def global_name(local: str, pipelined: bool, num_layers: int) -> str:
    """A parallel module's (or a DeepSpeed checkpoint's) key -> the single-device model's name; a legacy expert key
    keeps its `.deepspeed_experts.<id>.` part (see `shard_of`)."""
    key = local
    if pipelined:
        index, rest = key.split(".", 1)
        index = int(index)
        if index == 0:
            key = f"model.{rest}"
        elif index <= num_layers:
            key = f"model.layers.{index - 1}.{rest.removeprefix('layer.')}"
        else:
            key = rest if rest.startswith("lm_head") else f"model.{rest}"
    return LEGACY_GATE.sub(".mlp.gate.", key)


def score_biases(module: nn.Module, pipelined: bool, config) -> dict[int, torch.Tensor]:
    """This rank's routers' score biases by MoE layer (the row of `StepStats.expert_counts_LE`:
    `config.moe_layers.index(layer)`), under any layout and backend."""
    biases = {}
    for local, buffer in state_buffers(module):
        layer = int(global_name(local, pipelined, config.num_hidden_layers).split(".")[2])  # model.layers.<i>.mlp...
        biases[config.moe_layers.index(layer)] = buffer
    return biases


def keep_fp32(module: nn.Module) -> None:
    """Put `module`'s state buffers back in fp32 after an engine cast the module to bf16/fp16: the balance rule's
    steps (0.001) are below bf16's resolution at 1."""
    for local, buffer in list(state_buffers(module)):
        owner, _, name = local.rpartition(".")
        module.get_submodule(owner).register_buffer(name, buffer.float())


@dataclass(frozen=True)
class Shard:
    """`global[name][index]` is what a local parameter holds (`index` () for all of it); `fill` the rows of the local
    tensor it fills (None: all): the AutoEP block's experts hold all E but only this rank's are read and used."""

    name: str
    index: tuple = ()
    fill: slice | None = None


def shard_of(local: str, local_shape: torch.Size, global_shapes: dict[str, torch.Size], pipelined: bool,
             num_layers: int, tp_rank: int, ep_rank: int, ep: int, autoep: bool) -> Shard:
    """Which part of which global parameter the local parameter `local` holds (module docstring's table)."""
    name = global_name(local, pipelined, num_layers)
    expert = LEGACY_EXPERT.match(name)
    if expert:  # the module numbers its experts from 0 on every rank (its checkpoint files by global id)
        stacked = f"{expert['prefix']}.mlp.experts.{expert['name']}"
        return Shard(stacked, (ep_rank * global_shapes[stacked][0] // ep + int(expert["id"]),))
    moe = AUTOEP.match(name) if autoep else None
    if moe:
        prefix, rest = moe["prefix"], moe["rest"]
        if rest in AUTOEP_EXPERTS:  # AutoEP's layer, once `deepspeed.initialize` converted the block
            w = rest[-2:]
            stacked = f"{prefix}.mlp.experts.{'down_proj' if w == 'w2' else 'gate_up_proj'}"
            E, rows = global_shapes[stacked][0], local_shape[1]
            mine = slice(ep_rank * E // ep, (ep_rank + 1) * E // ep)
            return Shard(stacked, (mine,) if w == "w2" else (mine, slice(0, rows) if w == "w1" else slice(rows, 2 * rows)))
        name = f"{prefix}.mlp.{block_name(rest) or rest}"  # the router, score bias, shared experts: whole
        if rest.startswith("experts."):  # the block before conversion: all E held, this rank's filled
            E = global_shapes[name][0]
            mine = slice(ep_rank * E // ep, (ep_rank + 1) * E // ep)
            return Shard(name, (mine,), fill=mine)
    whole = global_shapes[name]
    if tuple(local_shape) == tuple(whole):
        return Shard(name)
    proj = name.rsplit(".", 2)[-2]
    if proj in TP_ROWS:
        rows = local_shape[0]
        return Shard(name, (slice(tp_rank * rows, (tp_rank + 1) * rows),))
    if proj == "o_proj":
        cols = local_shape[1]
        return Shard(name, (slice(None), slice(tp_rank * cols, (tp_rank + 1) * cols)))
    raise ValueError(f"{local} {tuple(local_shape)} is no known part of {name} {tuple(whole)}")


class Source(Protocol):
    def read(self, name: str, index: tuple) -> torch.Tensor:
        """`global[name][index]` as a new fp32 (or stored-dtype) CPU tensor."""


class SeededInit:
    """The model's initialisation (normal(0, initializer_range) for matrices, ones for norms, zeros for biases, the
    padding row of the embedding zero) drawn from one generator per parameter, and per expert for stacked expert
    tensors, each seeded by a hash of (seed, name[, expert]): any part of the model comes out the same whoever draws
    it and whatever else they draw."""

    def __init__(self, config, seed: int, global_shapes: dict[str, torch.Size]):
        self.config, self.seed, self.shapes = config, seed, global_shapes

    def _stream(self, *key) -> torch.Generator:
        digest = hashlib.sha256(":".join(str(k) for k in (self.seed, *key)).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))

    def _draw(self, name: str, shape, *key) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name.endswith("bias"):  # q/k/v/o biases (`attention_bias`), score biases: zeros, as transformers does
            return torch.zeros(shape)
        tensor = torch.empty(shape).normal_(0.0, self.config.initializer_range, generator=self._stream(name, *key))
        pad = self.config.pad_token_id
        if name == "model.embed_tokens.weight" and pad is not None:
            tensor[pad] = 0.0
        return tensor

    def read(self, name: str, index: tuple) -> torch.Tensor:
        shape = self.shapes[name]
        if ".mlp.experts." not in name:
            return self._draw(name, shape)[index]
        first, rest = (index[0] if index else slice(None)), index[1:]
        if isinstance(first, int):
            return self._draw(name, shape[1:], first)[rest]
        experts = range(shape[0])[first]
        return torch.stack([self._draw(name, shape[1:], e) for e in experts])[(slice(None), *rest)]


class SafetensorsSource:
    """A Hugging Face folder's weights (one `model.safetensors` or shards named by `model.safetensors.index.json`),
    read lazily: `safe_open(...).get_slice(name)[index]` reads only the slice's bytes."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
            absent = sorted({file for file in files.values() if not (folder / file).is_file()})
            if absent:
                raise FileNotFoundError(f"{folder}: {index.name} names {len(absent)} shard(s) the folder lacks "
                                        f"({', '.join(absent[:3])}); copy the whole folder")
        else:
            single = folder / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(f"{folder} has no model.safetensors nor model.safetensors.index.json; "
                                        "pass a folder written by save_pretrained")
            with safe_open(single, framework="pt") as handle:
                files = {key: single.name for key in handle.keys()}
        self.folder, self.files, self._open = folder, files, safe_open
        self.handles: dict[str, object] = {}
        config = folder / "config.json"  # the multi-token-prediction layers its config states (`formats.mtp_layers`)
        self.mtp_layers = mtp_layers(json.loads(config.read_text())) if config.is_file() else range(0)

    def names(self) -> set[str]:
        return set(self.files)

    def problem(self, shapes: dict[str, torch.Size]) -> str | None:
        """What keeps this folder from filling a model of these parameter shapes (`global_shapes`): the first
        missing or differently shaped tensor, named; None when every one is there (headers only are read)."""
        for name, shape in shapes.items():
            if hub_parts(name, 0) is not None and name not in self.files:
                parts = self._expert_parts(name, shape[0])
                if parts is None:
                    return f"{self.folder} has no {name} (nor its Hub tensors {hub_parts(name, 0, 1)[0]}, ...)"
                found = torch.Size([shape[0], sum(self.shape(k)[0] for k in parts[0]), *self.shape(parts[0][0])[1:]])
            else:
                stored = self._stored_name(name)
                if stored is None:
                    return f"{self.folder} has no tensor {name}"
                found = self.shape(stored)
            if found != shape:
                return f"{self.folder}: {name} is {tuple(found)}, the model's is {tuple(shape)}"
        return None

    def left_out(self) -> list[str]:
        """The tensors of the multi-token-prediction layers its config.json states (`formats.mtp_layers`), sorted:
        this model trains the main layers only, so these are never read nor counted as unexpected."""
        return sorted(n for n in self.files if in_mtp_layer(n, self.mtp_layers))

    def left_out_line(self) -> str | None:
        """One line naming the multi-token-prediction layers left out (`left_out`), None where there are none."""
        names = self.left_out()
        if not names:
            return None
        layers = sorted({int(n.split(".")[2]) for n in names})
        count = sum(prod(self.shape(n)) for n in names)
        return (f"moe: init_from: leaving out the checkpoint's {len(layers)} multi-token-prediction "
                f"layer{'s' if len(layers) > 1 else ''} ({', '.join(f'model.layers.{i}.*' for i in layers)}, "
                f"{count:,} parameters): this model trains the main layers only")

    def unexpected(self, shapes: dict[str, torch.Size]) -> list[str]:
        """The folder's tensors that no parameter of a model of these shapes reads (under its own name or its Hub
        names, `formats.hub_names` and `hub_parts`), sorted; RoPE frequency buffers older transformers saved are not
        counted (they are recomputed), nor the multi-token-prediction layers its config states (`left_out`)."""
        read = set()
        for name, shape in shapes.items():
            read.update(hub_names(name))
            if hub_parts(name, 0) is not None:
                read.update(key for layout in range(len(HUB_EXPERT_LAYOUTS)) for e in range(shape[0])
                            for key in hub_parts(name, e, layout))
        return sorted(n for n in self.files if n not in read and not n.endswith("rotary_emb.inv_freq")
                      and not in_mtp_layer(n, self.mtp_layers))

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self._handle(name).get_slice(name).get_shape())

    def _stored_name(self, name: str) -> str | None:
        return next((n for n in hub_names(name) if n in self.files), None)

    def _expert_parts(self, name: str, experts: int) -> list[list[str]] | None:
        """Per expert, the Hub tensors holding it in this folder's layout (`formats.HUB_EXPERT_LAYOUTS`), or None."""
        for layout in range(len(HUB_EXPERT_LAYOUTS)):
            parts = [hub_parts(name, e, layout) for e in range(experts)]
            if all(key in self.files for keys in parts for key in keys):
                return parts
        return None

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self.handles:
            self.handles[file] = self._open(self.folder / file, framework="pt")
        return self.handles[file]

    def read(self, name: str, index: tuple) -> torch.Tensor:
        if name not in self.files:
            return self._read_hub(name, index)
        part = self._handle(name).get_slice(name)
        if not index:
            return part[:]
        if isinstance(index[0], int):  # one expert: read its row block, then drop the expert dimension
            e = index[0]
            return part[(slice(e, e + 1), *index[1:])][0]
        return part[index]

    def _read_hub(self, name: str, index: tuple) -> torch.Tensor:
        """A parameter of a Hub-format folder (`formats`: one tensor per expert, gate and up apart; or another name)."""
        if hub_parts(name, 0) is None:
            stored = self._stored_name(name)
            return self._handle(stored).get_slice(stored)[index or (slice(None),)]
        layer = name.partition(".mlp.experts.")[0]
        experts = sum(1 for key in self.files if key.startswith(layer + ".") and ".experts." in key
                      and key.endswith(tuple(f".{down}.weight" for *_, down in HUB_EXPERT_LAYOUTS)))
        parts = self._expert_parts(name, experts)
        first, rest = (index[0] if index else slice(None)), index[1:]
        chosen = [first] if isinstance(first, int) else list(range(experts))[first]
        blocks = [torch.cat([self._handle(key).get_slice(key)[:] for key in parts[e]]) for e in chosen]
        return (blocks[0] if isinstance(first, int) else torch.stack(blocks))[rest]


def region(index: tuple, shape: torch.Size) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """`tensor[index]` for a tensor of `shape` as per-dimension `[start, stop)` spans over every dimension, and the
    dimensions an integer index drops. `index` holds ints and unit-step slices over the leading dimensions (a
    `Shard`'s)."""
    spans, dropped = [], []
    for dim, size in enumerate(shape):
        part = index[dim] if dim < len(index) else slice(None)
        if isinstance(part, int):
            spans.append((part, part + 1))
            dropped.append(dim)
            continue
        start, stop, step = part.indices(size)
        if step != 1:
            raise ValueError(f"{index} steps by {step}: pieces are contiguous blocks")
        spans.append((start, stop))
    return tuple(spans), tuple(dropped)


PIECE_SEPARATOR = "|"


def piece_key(state: str, name: str, spans: tuple[tuple[int, int], ...]) -> str:
    """A piece's name in a checkpoint's safetensors files: `<state>|<global name>|<start>:<stop>,...` (`region`)."""
    return PIECE_SEPARATOR.join((state, name, ",".join(f"{a}:{b}" for a, b in spans)))


def parse_piece_key(key: str) -> tuple[str, str, tuple[tuple[int, int], ...]]:
    state, name, spans = key.split(PIECE_SEPARATOR)
    return state, name, tuple((int(a), int(b)) for a, b in (span.split(":") for span in spans.split(",")))


class PieceSource:
    """One state (`fp32`, `exp_avg`, ...) of a model written in pieces (`piece_key`) over safetensors files by the
    ranks of another layout: `read(name, index)` assembles `global[name][index]` from the parts of every piece it
    overlaps (safetensors `get_slice`: only those bytes are read). A slice the pieces do not cover whole (a rank's
    file lost, a writer that kept only its own experts) is a `LookupError` naming the parameter and how much is
    missing: never zeros or stale values."""

    def __init__(self, files: list[Path], state: str, global_shapes: dict[str, torch.Size]):
        from safetensors import safe_open

        self.state, self.shapes = state, global_shapes
        self.handles = [safe_open(path, framework="pt") for path in files]
        self.pieces: dict[str, list[tuple[tuple[tuple[int, int], ...], object, str]]] = {}
        for handle in self.handles:
            for key in handle.keys():
                piece_state, name, spans = parse_piece_key(key)
                if piece_state == state:
                    self.pieces.setdefault(name, []).append((spans, handle, key))

    def read(self, name: str, index: tuple) -> torch.Tensor:
        spans, dropped = region(index, self.shapes[name])
        out = torch.empty([b - a for a, b in spans])
        covered = 0
        for piece_spans, handle, key in self.pieces.get(name, []):
            overlap = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(spans, piece_spans)]
            if any(a >= b for a, b in overlap):
                continue
            source = tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(overlap, piece_spans))
            target = tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(overlap, spans))
            out[target] = handle.get_slice(key)[source]
            covered += prod(b - a for a, b in overlap)
        if covered != out.numel():  # pieces never overlap (each written once), so the count is the coverage
            raise LookupError(f"the checkpoint's {self.state} pieces hold {covered} of the {out.numel()} values of "
                              f"{name}{list(spans)}: a rank's piece is missing")
        for dim in reversed(dropped):
            out = out.squeeze(dim)
        return out


def rank_shards(module: nn.Module, layout, config, rank: int) -> dict[str, Shard]:
    """Every parameter and state buffer of `module` (this rank's share under `layout`, before or after
    `deepspeed.initialize`) -> its `Shard`. A ZeRO-3 parameter's own shape is `ds_shape` (its data is a partition)."""
    shapes = global_shapes(config)
    coords = layout.coords(rank)
    return {name: shard_of(name, getattr(p, "ds_shape", p.shape), shapes, layout.pp > 1, config.num_hidden_layers,
                           coords["model"], coords["expert"], layout.ep, layout.moe_backend == "autoep")
            for name, p in state_tensors(module)}


def allocate(module: nn.Module) -> nn.Module:
    """Give `module`'s meta parameters (uninitialised) CPU memory, keeping what DeepSpeed and the tensor-parallel
    code marked on them (`allreduce`, `group_name`, `tensor_model_parallel`, ...): `to_empty` makes new Parameter
    objects when the device changes and would drop those attributes."""
    if not any(p.is_meta for p in module.parameters()):
        return module
    marks = {name: dict(vars(p)) for name, p in module.named_parameters()}
    module.to_empty(device="cpu", recurse=True)
    for name, p in module.named_parameters():
        vars(p).update(marks[name])
    return module


def materialize(module: nn.Module, shards: dict[str, Shard], source: Source) -> None:
    """Allocate `module`'s meta parameters on the CPU (`allocate`) and fill each, and each state buffer, from
    `source` by its `Shard`."""
    allocate(module)
    with torch.no_grad():
        for local, param in state_tensors(module):
            shard = shards[local]
            target = param if shard.fill is None else param[shard.fill]
            target.copy_(source.read(shard.name, shard.index).to(param.dtype))


def global_shapes(config) -> dict[str, torch.Size]:
    """Every parameter's and state buffer's shape in the single-device model (built on the meta device: no memory)."""
    from ..modeling import MoEForCausalLM

    with torch.device("meta"):
        return {name: p.shape for name, p in state_tensors(MoEForCausalLM(config))}


def seeded_model(config, seed: int):
    """The whole single-device model with `SeededInit`'s weights: what every layout's shares add up to."""
    from ..modeling import MoEForCausalLM

    with torch.device("meta"):
        model = MoEForCausalLM(config)
    shapes = global_shapes(config)
    materialize(model, {name: Shard(name) for name, _ in state_tensors(model)}, SeededInit(config, seed, shapes))
    return model
