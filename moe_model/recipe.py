"""The recipe: one YAML file that says what model to train, how to split it, on what data and hardware.

Typed with pydantic; every rule that can be checked before launch is checked here, and a broken recipe becomes one
`RecipeError` whose text names the field and the fix. `--set a.b=value` overrides are applied to the raw YAML
before validation, so they are validated exactly like the file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from .configuration import MoEConfig
from .devices import FLAT, GPU_CLASSES, class_defaults
from .errors import UserError
from .strategy import Strategy

DEFAULT_WARMUP_STEPS = 10


class RecipeError(UserError, ValueError):
    """A recipe that cannot run. `str()` is the one line shown to the user."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


class Section(BaseModel):
    """Every recipe section: unknown keys refused, floats finite (`.inf`, `1e400`, `.nan` are refused: no recipe
    figure means anything infinite), and a number field refuses true/false (pydantic's lax mode reads `true` as 1;
    its strict mode would also refuse the strings PyYAML makes of `1e-4`, so only the bool is refused here)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and _is_number_field(cls.model_fields[info.field_name].annotation):
            raise PydanticCustomError("bool_for_number", "is true/false but must be a number")
        return value


def _is_number_field(annotation: Any) -> bool:
    """Whether a field holds an int or float (alone, optional, or a Literal of numbers) and no bool."""
    if get_origin(annotation) is Literal:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in get_args(annotation))
    options = [get_args(o)[0] if get_origin(o) is Annotated else o for o in get_args(annotation) or (annotation,)]
    return bool not in options and any(o in (int, float) for o in options)


class ModelSection(Section):
    """MoEConfig keyword arguments (transformers' Mixtral names where the concept is shared)."""

    vocab_size: PositiveInt = 32000
    hidden_size: PositiveInt = 1024
    intermediate_size: PositiveInt = 2048
    num_hidden_layers: PositiveInt = 16
    num_attention_heads: PositiveInt = 16
    num_key_value_heads: PositiveInt | None = None
    head_dim: PositiveInt | None = None
    num_local_experts: PositiveInt = 64
    num_experts_per_tok: PositiveInt = 2
    hidden_act: Literal["gelu", "silu"] = "gelu"
    max_position_embeddings: PositiveInt = 10240
    tie_word_embeddings: bool = False
    rms_norm_eps: PositiveFloat = 1e-5
    rope_theta: PositiveFloat = 10000.0
    router_aux_loss_coef: float = Field(0.01, ge=0)
    router_z_loss_coef: float = Field(0.0, ge=0)
    capacity_factor: PositiveFloat | None = None
    min_capacity: PositiveInt = 4
    router_aux_loss_per_sequence: bool = False  # the balance loss per sequence (DeepSeek-V3), not per micro-batch
    router_bias_update_rate: float = Field(0.0, ge=0)  # aux-loss-free balancing: the score bias's step per update
    initializer_range: PositiveFloat = 0.02
    # the blocks of the other families (MoEConfig's docstring; `formats.FAMILIES`): every default is Mixtral's block
    moe_intermediate_size: PositiveInt | None = None
    dense_layers: list[Annotated[int, Field(ge=0)]] = []
    num_shared_experts: int = Field(0, ge=0)
    shared_expert_intermediate_size: PositiveInt | None = None
    shared_expert_gate: bool = False
    router_scoring: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: PositiveFloat = 1.0
    n_group: PositiveInt | None = None
    topk_group: PositiveInt | None = None
    router_score_bias: bool = False
    qk_norm: Literal["head", "projection"] | None = None
    attention_bias: bool = False
    attention_out_bias: bool = False
    clip_qkv: PositiveFloat | None = None
    partial_rotary_factor: float = Field(1.0, gt=0, le=1)  # the share of each head RoPE rotates (GLM: 0.5)
    # multi-head latent attention (DeepSeek-V3, MoEConfig's docstring): on where kv_lora_rank is set
    q_lora_rank: PositiveInt | None = None
    kv_lora_rank: PositiveInt | None = None
    qk_nope_head_dim: PositiveInt | None = None
    qk_rope_head_dim: PositiveInt | None = None
    v_head_dim: PositiveInt | None = None
    rope_interleave: bool = False
    # a scaled RoPE (transformers' rope_parameters names: rope_type yarn, factor, original_max_position_embeddings,
    # beta_fast, beta_slow, mscale, mscale_all_dim; ...); rope_theta and partial_rotary_factor stay their own fields
    rope_parameters: dict[str, float | int | str] | None = None

    @field_validator("rope_parameters")
    @classmethod
    def _rope_theta_once(cls, value):
        if value and {"rope_theta", "partial_rotary_factor"} & set(value):
            raise ValueError("rope_theta and partial_rotary_factor are model fields of their own; take them out of "
                             "rope_parameters")
        return value

    def to_config(self) -> MoEConfig:
        fields = self.model_dump()
        partial = fields.pop("partial_rotary_factor")
        rope = {"rope_type": "default", **(fields.pop("rope_parameters") or {}), "rope_theta": self.rope_theta}
        return MoEConfig(**fields, rope_parameters=rope if partial == 1.0 else {**rope, "partial_rotary_factor": partial})


class ParallelSection(Section):
    tp: PositiveInt = 1
    pp: PositiveInt = 1
    ep: PositiveInt = 1
    dp: PositiveInt | None = None  # None: world size / (tp * pp) at launch
    zero_stage: Literal[0, 1, 2, 3] = 1
    micro_batch_size: PositiveInt = 1
    activation_checkpointing: bool = False
    # auto: DeepSpeed's AutoEP where experts are split and it serves the model, else legacy (`strategy` docstring)
    moe_backend: Literal["auto", "autoep", "legacy"] = "auto"


class TrainSection(Section):
    global_batch_size: PositiveInt = 8  # sequences per optimizer step
    seq_len: PositiveInt = 128
    steps: PositiveInt = 100
    lr: PositiveFloat = 3e-4
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int | None = Field(None, ge=0, validate_default=True)  # None: min(10, steps), see below
    weight_decay: float = Field(0.1, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    seed: int = 1234
    output_dir: str | None = None  # default: runs/<name>
    log_every: PositiveInt = 1
    save_every: int = Field(0, ge=0)  # 0: none on the way (save_last still writes the last step's)
    save_last: bool = True  # a checkpoint at the last step whatever save_every says (what `moe export` reads)
    keep_checkpoints: int = Field(3, ge=0)  # newest complete checkpoints kept (0: all)
    resume: str = "auto"  # auto | never | PATH (a checkpoint of another layout resumes through its portable states)
    portable_checkpoints: bool = True  # also save states by global name: another layout or ZeRO stage can resume
    stop_at: PositiveInt | None = None  # end this launch after this step, saving a checkpoint; `steps` sets the schedule
    init_from: str | None = None  # a Hugging Face folder (native or Mixtral) whose weights a fresh run starts from
    init_from_unexpected: Literal["refuse", "ignore"] = "refuse"  # tensors of that folder the model does not read
    overwrite: bool = False  # start over in a directory holding a run: its files go to archive-<time>/ first
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    eval_every: int = Field(0, ge=0)  # validation loss every N steps and at the last step (0: never)
    eval_batches: PositiveInt = 2  # global batches of validation sequences per evaluation
    eval_at_start: bool = False  # with eval_every: also before the first step of a fresh run (a metrics line, step 0)
    # minutes a collective waits for the slowest rank before the run fails: covers one rank building the token
    # cache or verifying a large checkpoint's digests while the others wait (DeepSpeed's own default, 10, does not)
    collective_timeout_min: PositiveFloat = 60.0

    @field_validator("warmup_steps")
    @classmethod
    def _default_warmup(cls, value: int | None, info: ValidationInfo) -> int | None:
        """Unset: `DEFAULT_WARMUP_STEPS`, or the whole run when it is shorter (a default never makes a valid recipe
        invalid); a written warmup longer than the run stays an error (`Recipe`)."""
        if value is None and "steps" in info.data:
            return min(DEFAULT_WARMUP_STEPS, info.data["steps"])
        return value


class DataSection(Section):
    source: Literal["synthetic", "text", "json", "parquet", "hub"] = "synthetic"
    path: str | None = None
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    tokenizer: str = "byte"  # train | byte | PATH
    vocab_size: PositiveInt | None = None
    subset: str | None = None  # hub: the dataset's configuration, e.g. wikitext-103-raw-v1
    validation_fraction: float = Field(0.05, ge=0, lt=1)  # documents held out for the validation loss
    max_documents: PositiveInt | None = None  # read at most this many documents (a slice of a huge corpus)


class HardwareSection(Section):
    """Per-GPU figures. The seed gives compute and HBM; the interconnect is an assumption (see README).

    `gpu` names a device class (`devices.GPU_CLASSES`: h100_sxm, h200_sxm, h800_sxm, a100_sxm) whose datasheet and
    GEMM-shape figures fill every field the recipe leaves out; a field the recipe states wins. Without it the shape
    figures are `devices.FLAT`: every GEMM at `mfu`, no per-kernel cost, as recipes meant before they existed."""

    gpu: Literal[tuple(GPU_CLASSES)] | None = None  # type: ignore[valid-type]
    gpu_memory_gb: PositiveFloat = 64.0
    peak_tflops: PositiveFloat = 400.0
    mfu: float = Field(0.6, gt=0, le=1)
    hbm_bandwidth_tbps: PositiveFloat = 1.8  # TB/s
    bandwidth_utilization: float = Field(0.8, gt=0, le=1)
    gpus_per_node: PositiveInt = 8
    intra_node_gbps: PositiveFloat = 400.0  # GB/s per GPU per direction inside a node (NVLink-class), ASSUMED
    inter_node_gbps: PositiveFloat = 50.0  # GB/s per GPU per direction across nodes (one 400 Gb/s NIC), ASSUMED
    # time per step that does not grow with the model: op dispatch, DeepSpeed's engine and pipeline instructions,
    # collective latencies. 0 = not modelled (negligible next to a GPU-sized step); `moe calibrate` measures it
    step_overhead_ms: float = Field(0.0, ge=0)
    # GEMM time by shape (`estimate.kernels`): tiles running at once (0: no wave quantisation), a large GEMM's output
    # tile (rows, columns), the K depth at which a tile reaches half its rate, one kernel's fixed cost, and the fused
    # attention's fraction of the peak over forward and backward (None: `mfu`)
    sm_count: int = Field(FLAT["sm_count"], ge=0)
    gemm_tile: tuple[PositiveInt, PositiveInt] = FLAT["gemm_tile"]
    gemm_k_half: float = Field(FLAT["gemm_k_half"], ge=0)
    kernel_launch_us: float = Field(FLAT["kernel_launch_us"], ge=0)
    attention_efficiency: float | None = Field(FLAT["attention_efficiency"], gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _class_figures(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("gpu") in GPU_CLASSES:
            return {**class_defaults(data["gpu"]), **data}
        return data


class WandbSection(Section):
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "moe-recipes"
    entity: str | None = None
    group: str | None = None


class TrackingSection(Section):
    wandb: WandbSection = WandbSection()


class ClaimsSection(Section):
    """Statements of a hand-written plan, checked by `moe audit` (moe_model/estimate/audit.py). None: not stated.

    A memory claim is for the whole model (one copy of its states, the whole global batch's activations) unless its
    name says per GPU; fractions (`mfu`, `memory_efficiency`) are written as fractions, 0.6 for 60%.
    """

    total_params: PositiveFloat | None = None
    gpus: PositiveInt | None = None
    experts_per_gpu: PositiveFloat | None = None
    memory_per_gpu_gb: PositiveFloat | None = None
    step_latency_s: PositiveFloat | None = None
    throughput_seq_per_s: PositiveFloat | None = None
    layers_per_stage: PositiveFloat | None = None
    hidden_per_tp_rank: PositiveFloat | None = None
    heads_per_tp_rank: PositiveFloat | None = None
    effective_batch_size: PositiveInt | None = None
    gradient_accumulation_steps: PositiveInt | None = None
    param_memory_gb: PositiveFloat | None = None
    activation_memory_gb: PositiveFloat | None = None
    gradient_memory_gb: PositiveFloat | None = None
    optimizer_memory_gb: PositiveFloat | None = None
    total_memory_gb: PositiveFloat | None = None
    fits_gpu_memory: bool | None = None
    mfu: float | None = Field(None, gt=0, le=1)
    memory_efficiency: float | None = Field(None, gt=0, le=1)


class Recipe(Section):
    name: str = "unnamed"
    model: ModelSection
    parallel: ParallelSection = ParallelSection()
    train: TrainSection = TrainSection()
    data: DataSection = DataSection()
    hardware: HardwareSection = HardwareSection()
    tracking: TrackingSection = TrackingSection()
    claims: ClaimsSection = ClaimsSection()

    @model_validator(mode="before")
    @classmethod
    def _model_from_init_from(cls, raw: Any) -> Any:
        """With `train.init_from` the model is the folder's: an omitted `model` section (or field) is taken from its
        config.json; an architecture field stated otherwise is one error naming every field that differs."""
        train = raw.get("train") if isinstance(raw, dict) else None
        folder = train.get("init_from") if isinstance(train, dict) else None
        if not folder:
            return raw
        from .formats import architecture_differences, model_fields

        if not Path(folder).is_dir():
            raise RecipeError("train.init_from", f"{folder!r} is not a folder; pass a Hugging Face model folder "
                                                 "(config.json and safetensors), e.g. one written by moe export")
        try:
            fields = model_fields(Path(folder))
        except ValueError as err:
            raise RecipeError("train.init_from", str(err)) from None
        stated = raw.get("model") or {}
        if not isinstance(stated, dict):
            return raw
        differ = architecture_differences(fields, stated)
        if differ:
            raise RecipeError("model", (f"differs from train.init_from's model ({', '.join(differ)}); omit these "
                                        "fields (or the whole model section) to take the folder's"))
        return {**raw, "model": {**fields, **stated}}

    @model_validator(mode="after")
    def _check_across_sections(self) -> Recipe:
        try:
            self.model.to_config()
        except ValueError as err:
            raise RecipeError("model", f"{err}") from None
        self.check_strategy(Strategy.of(self.parallel))  # dp unset: its rules wait for the world size
        t = self.train
        if t.seq_len > self.model.max_position_embeddings:
            raise RecipeError("train.seq_len", (f"{t.seq_len} exceeds model.max_position_embeddings "
                                                f"({self.model.max_position_embeddings}); lower it or raise that"))
        if t.warmup_steps > t.steps:  # only a written warmup can: the default never exceeds the run
            raise RecipeError("train.warmup_steps", f"{t.warmup_steps} exceeds train.steps ({t.steps})")
        if t.resume not in ("auto", "never") and not Path(t.resume).exists():
            raise RecipeError("train.resume", f"checkpoint path {t.resume!r} does not exist; use auto, never or "
                                              "an existing checkpoint directory")
        self._check_data()
        return self

    def _check_data(self) -> None:
        d = self.data
        if d.source in ("text", "json", "parquet"):
            if not d.path:
                raise RecipeError("data.path", f"source {d.source!r} needs a path to a file or folder")
            if not Path(d.path).exists():
                raise RecipeError("data.path", f"{d.path!r} does not exist; fix the path (relative paths are "
                                               "taken from the current directory)")
        if d.source == "hub" and not d.name:
            raise RecipeError("data.name", "source 'hub' needs the dataset name, e.g. name: wikitext")
        if d.source != "synthetic" and d.tokenizer not in ("train", "byte") and not Path(d.tokenizer).exists():
            raise RecipeError("data.tokenizer", f"{d.tokenizer!r} is not train, byte or an existing tokenizer "
                                                "folder; fix the path (relative paths are taken from the current "
                                                "directory)")
        if self.train.eval_every and d.source != "synthetic" and d.validation_fraction == 0:
            raise RecipeError("data.validation_fraction", "is 0 but train.eval_every asks for a validation loss; "
                                                          "hold out documents (e.g. 0.05) or set eval_every 0")
        if d.vocab_size is not None and d.vocab_size > self.model.vocab_size:
            raise RecipeError("data.vocab_size", (f"{d.vocab_size} exceeds model.vocab_size "
                                                  f"({self.model.vocab_size}); the embedding would be too small"))

    def strategy(self, world_size: int | None = None) -> tuple[Strategy, bool]:
        """(this recipe's strategy with dp resolved, whether dp was assumed) on `world_size` ranks (None: before
        launch; see `Strategy.resolved`). A broken layout rule is a `RecipeError`."""
        stated = Strategy.of(self.parallel)
        problem = stated.world_problem(world_size)
        if problem:
            raise RecipeError(*problem)
        strategy, dp_assumed = stated.resolved(world_size)
        self.check_strategy(strategy, dp_assumed=dp_assumed)
        return strategy.with_backend(self.model), dp_assumed

    def check_strategy(self, strategy: Strategy, *, dp_assumed: bool = False) -> None:
        """`strategy` (this recipe's or another, e.g. a planner candidate) against every rule of `Strategy.problem`
        for this model, hardware and global batch; the first broken one is a `RecipeError`."""
        problem = strategy.problem(self.model, self.hardware.gpus_per_node, self.train.global_batch_size,
                                   dp_assumed=dp_assumed)
        if problem:
            raise RecipeError(*problem)

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir or f"runs/{self.name}")

    def moe_config(self) -> MoEConfig:
        return self.model.to_config()


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` to the raw recipe mapping; the value is parsed as YAML (1e-4, null, true, [1, 2])."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise RecipeError("--set", f"{assignment!r} is not key=value; write e.g. --set train.steps=20")
    parts = key.strip().split(".")
    node, schema = raw, Recipe
    for i, part in enumerate(parts[:-1]):
        field = schema.model_fields.get(part) if schema is not None else None
        schema = field.annotation if field is not None and isinstance(field.annotation, type) and issubclass(
            field.annotation, BaseModel) else None
        child = node.setdefault(part, {})
        if not isinstance(child, dict) or (field is not None and schema is None):  # a value, stated or not
            raise RecipeError("--set", f"{'.'.join(parts[: i + 1])} is a value, not a section; cannot set {key}")
        node = child
    try:
        node[parts[-1]] = yaml.load(text, Loader=UniqueKeyLoader) if text.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = text


def _describe(error: dict) -> RecipeError:
    field = ".".join(str(part) for part in error["loc"]) or "recipe"
    kind = error["type"]
    if kind == "extra_forbidden":
        return RecipeError(field, "unknown key; remove it or check its spelling against DESIGN.md's recipe schema")
    if kind == "missing":
        return RecipeError(field, "is required")
    if kind == "bool_for_number":
        return RecipeError(field, f"is {str(error.get('input')).lower()} but must be a number; write a number "
                                  "(e.g. --set train.steps=20)")
    if kind == "finite_number":
        return RecipeError(field, f"must be a finite number (got {error.get('input')!r}); write an ordinary number "
                                  "such as 3e-4")
    given = error.get("input")
    return RecipeError(field, f"{error['msg'][0].lower()}{error['msg'][1:]} (got {given!r})")


def recipe_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    raw = copy.deepcopy(raw)
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return Recipe.model_validate(raw)
    except RecipeError:
        raise
    except ValidationError as err:
        first = err.errors()[0]
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, RecipeError):
            raise cause from None
        raise _describe(first) from None


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping: PyYAML keeps the last one silently (a
    second `train:` section dropped the first), which YAML 1.2 forbids. The error names the key and both lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys written here may override those
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (lines {first_line[key]} and {line}); keep one "
                                    "(merge the two sections into one)", key_node.start_mark)
                first_line[key] = line
            except TypeError:  # an unhashable key: the base class refuses it with its own message
                continue
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, field: str) -> Any:
    """The YAML document in `path` (UniqueKeyLoader); a file that is not UTF-8 text or not valid YAML is a
    RecipeError on `field` naming the byte offset, or the line and column."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(field, f"{path} is not a text file (byte 0x{err.object[err.start]:02x} at offset "
                                 f"{err.start} is not UTF-8); pass a YAML recipe") from None
    except OSError as err:
        raise RecipeError(field, f"cannot read {path} ({err.strerror}); check its permissions") from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(field, f"{path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError("recipe", f"{str(path)!r} is not a file; pass the path of a YAML recipe, e.g. "
                                    "recipes/tiny_cpu.yaml")
    raw = read_yaml(path, "recipe")
    if not isinstance(raw, dict):
        raise RecipeError("recipe", f"{path} must be a mapping with at least a 'model' section")
    return recipe_from_dict(_with_base(raw, path, seen=(path.resolve(),)), overrides)


def _with_base(raw: dict[str, Any], path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """`base: other.yaml` (relative to this file) starts from that recipe; this file's keys override it, section by section."""
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (path.parent / str(base)).resolve()
    if base_path in seen:
        raise RecipeError("base", f"{path} inherits from itself through {base}; break the cycle")
    if not base_path.is_file():
        raise RecipeError("base", f"{base!r} (from {path}) is not a file; paths are relative to the recipe")
    parent = read_yaml(base_path, "base")
    if not isinstance(parent, dict):
        raise RecipeError("base", f"{base_path} must be a mapping")
    return _merge(_with_base(parent, base_path, seen + (base_path,)), raw)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


