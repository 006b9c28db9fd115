"""Recipe + layout -> a DeepSpeed engine and the function that runs one optimizer step on it.

pp == 1: `DeepSpeedEngine` over `MoEForCausalLM` (tp/ep applied in place); pp > 1: `PipelineEngine` over the
`PipelineModule` of the same blocks. Both steps return this rank's `StepStats` (losses and routes per expert of
every layer), summed over its micro-batches, on the CPU; ranks that do not see the loss (earlier pipeline stages)
return zeros, so `StepStats.all_reduce` and `StepStats.mean` give the step's figures on any layout.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from ..estimate.memory import optimizer_kind
from ..losses import StepStats
from ..modeling import MoEForCausalLM
from ..parallel import Layout, build_model
from ..parallel.parallelize import ParallelModel
from ..parallel.state_dict_adapter import keep_fp32
from ..recipe import Recipe, RecipeError
from .ds_config import deepspeed_config

StepFn = Callable[[list[torch.Tensor]], StepStats]


def param_groups(model: torch.nn.Module, weight_decay: float, expert_parallel: bool) -> list[dict[str, Any]]:
    """Decay matrices only (norm gains are left alone); DeepSpeed's MoE needs expert parameters in groups of their own."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    if expert_parallel:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


def drops_clipped_norm(recipe: Recipe) -> bool:
    """Whether the project, not DeepSpeed, computes the gradient norm (and clips by it, `clip_keeping_norm`), because
    DeepSpeed 0.19.8's own is missing or wrong for the optimizer it builds (`estimate.memory.optimizer_kind`):

    - fp32 without ZeRO (no wrapper): the engine clips (`clip_fp32_gradients`) but drops the norm its
      `clip_grad_norm_` returns, so `get_global_grad_norm()` says None (only where there is a clip to run);
    - fp16, and bf16 with pp 1, without ZeRO (`FP16_UnfusedOptimizer`): `step` counts only the first half of
      `split_params_grads_into_shared_and_expert_params`, so every parameter tagged `allreduce=False` (each expert of
      the legacy layer and of AutoEP) is left out of the norm and of the clip; and its `_global_grad_norm` is the
      loss-scaled norm (`unscale_and_clip_grads`: "norm is in fact norm*scale"). Done whatever `grad_clip`.
    `BF16_Optimizer` (bf16 at ZeRO-0 with pp > 1, bf16 at ZeRO-1) and the ZeRO optimizers count the experts and
    report the unscaled norm themselves."""
    p, t = recipe.parallel, recipe.train
    kind = optimizer_kind(t.precision, p.zero_stage, p.pp)
    if kind == "torch AdamW (no wrapper)":
        return t.grad_clip > 0
    return kind == "FP16_UnfusedOptimizer"


def global_grad_norm(parameters, mpu, grads=None) -> torch.Tensor:
    """The 2-norm of the whole model's gradient, every parameter counted once on any layout, after the gradient
    all-reduce: DeepSpeed's bf16 optimizer's count (`BF16_Optimizer.get_grads_for_norm` and `step`) with its helpers.
    `grads`: the gradient to count for each parameter (default: its `.grad`); the parameters then only say what each
    gradient is (expert, tensor-parallel, pipeline-replicated), as for the fp32 copies DeepSpeed's 16-bit wrappers
    step, which carry none of those tags.

    Why not `deepspeed.runtime.utils.clip_grad_norm_`, which DeepSpeed's fp32 path uses: it counts a parameter only
    where `mpu.get_model_parallel_rank() == 0`, and a pipeline grid's model-parallel group is pipe x tensor, so every
    stage but the first adds nothing; and it averages the ranks' norms over the data-parallel group, which for
    expert-parallel ranks (each holding other experts) is not the norm of all the experts. Here: dense gradients
    summed over the model-parallel group (pipe x tensor; replicated ones from tensor rank 0 only), each expert group's
    over its expert-parallel group and the pipeline, as `get_norm_with_moe_layers` does.
    Returns a float32 scalar, +inf when a gradient is not finite.
    """
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import get_global_norm_of_tensors, get_norm_with_moe_layers, is_model_parallel_parameter
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank

    parameters = list(parameters)
    grads = [p.grad for p in parameters] if grads is None else list(grads)
    tp_rank = bwc_tensor_model_parallel_rank(mpu)
    dense: list[torch.Tensor] = []
    experts: dict[str, list[torch.Tensor]] = {}
    device = None
    for p, grad in zip(parameters, grads, strict=True):
        if grad is None or getattr(p, PIPE_REPLICATED, False):
            continue
        device = grad.device
        if is_moe_param(p):
            experts.setdefault(p.group_name, []).append(grad)
        elif tp_rank == 0 or is_model_parallel_parameter(p):
            dense.append(grad)
    # a rank with nothing to count still joins the collectives
    norm = get_global_norm_of_tensors(dense or [torch.zeros(1, device=device)], mpu=mpu)
    if experts:
        norm = get_norm_with_moe_layers(norm, mpu=mpu, expert_tensors=dict(sorted(experts.items())))
    norm = torch.as_tensor(norm, dtype=torch.float32)
    return torch.where(norm < 0, torch.full_like(norm, float("inf")), norm)  # DeepSpeed's -1: not finite


def clip_keeping_norm(engine, max_norm: float) -> None:
    """Clip by the whole model's norm and keep that norm (`drops_clipped_norm` says where): for an engine started
    with `gradient_clipping` 0; `max_norm` 0 records the norm without clipping.

    Why this way: `deepspeed.initialize` picks the engine class itself (DeepSpeedEngine or PipelineEngine), so an
    engine subclass that keeps the norm cannot be handed to it, and the pipeline engine steps inside `train_batch`,
    where the step function cannot reach. Torch's step pre-hook on the torch optimizer that steps runs where
    DeepSpeed's clip would (after the gradient all-reduce, just before the update): on the fp32 path that is the
    engine's optimizer and the gradients are the parameters' own; under `FP16_UnfusedOptimizer` it is the wrapped
    AdamW, and the gradients are the fp32 copies the wrapper made and divided by its loss scale, each counted as
    the 16-bit parameter it belongs to. The hook clips them by the `global_grad_norm` (the single-rank norm on every
    layout, experts included; DeepSpeed's `clip_grad_norm_` is not, see there) with DeepSpeed's
    `clip_tensors_by_global_norm`, and leaves the norm in the engine optimizer's `_global_grad_norm`, which the engine
    copies into its own after every step (how its ZeRO and 16-bit optimizers report theirs).
    """
    from deepspeed.runtime.utils import clip_tensors_by_global_norm

    wrapper = engine.optimizer if hasattr(engine.optimizer, "fp32_groups") else None  # FP16_UnfusedOptimizer

    def counted() -> tuple[list, list[torch.Tensor]]:
        if wrapper is None:
            params = [p for p in engine.module.parameters() if p.grad is not None]
            return params, [p.grad for p in params]
        pairs = [(low, high.grad) for lows, highs in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True)
                 for low, high in zip(lows, highs, strict=True) if high.grad is not None]
        return [p for p, _ in pairs], [g for _, g in pairs]

    def clip(optimizer, args, kwargs) -> None:
        params, grads = counted()
        norm = global_grad_norm(params, engine.mpu, grads)
        if max_norm > 0:
            clip_tensors_by_global_norm(grads, max_norm=max_norm, global_norm=norm)
        engine.optimizer._global_grad_norm = float(norm)

    (engine.optimizer if wrapper is None else wrapper.optimizer).register_step_pre_hook(clip)


def weights_source(recipe: Recipe, resuming: bool = False, pieces: Path | None = None):
    """Where the weights come from before a checkpoint (if any) is loaded: the fp32 pieces of a checkpoint written by
    another layout (`pieces`, `reshard`), `train.init_from`'s folder on a fresh run (read lazily, this rank's slices
    only), else the recipe's seed (`SeededInit`). A folder that cannot fill the model is a `RecipeError` naming the
    first tensor missing or shaped otherwise."""
    from ..parallel.state_dict_adapter import SeededInit, global_shapes

    config = recipe.moe_config()
    if pieces is not None:
        from .reshard import sources

        return sources(pieces, config, ("fp32",))["fp32"]
    shapes = global_shapes(config)
    if recipe.train.init_from and not resuming:
        return init_from_source(recipe, shapes)
    return SeededInit(config, recipe.train.seed, shapes)


def init_from_source(recipe: Recipe, shapes=None):
    """`train.init_from`'s folder as a weights source, checked whole from its headers (no weights read): every shard
    its index names present, every parameter there with its shape, and no tensor the model would not read unless
    `train.init_from_unexpected: ignore`, save the multi-token-prediction layers its config states, always left out
    (`formats.mtp_layers`; `moe train` says so in one line, `SafetensorsSource.left_out_line`). `moe train` runs it
    before any rank starts; a `RecipeError` otherwise."""
    from ..parallel.state_dict_adapter import SafetensorsSource, global_shapes

    shapes = shapes if shapes is not None else global_shapes(recipe.moe_config())
    try:
        source = SafetensorsSource(Path(recipe.train.init_from))
    except FileNotFoundError as err:
        raise RecipeError("train.init_from", str(err)) from None
    problem = source.problem(shapes)
    if problem:
        raise RecipeError("train.init_from", problem)
    unexpected = source.unexpected(shapes)
    if unexpected and recipe.train.init_from_unexpected == "refuse":
        raise RecipeError("train.init_from", (
            f"{recipe.train.init_from} holds {len(unexpected)} tensor(s) the model does not have "
            f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}); set "
            "train.init_from_unexpected=ignore to start without them"))
    return source


def rank_share(recipe: Recipe, layout: Layout, resuming: bool = False, pieces: Path | None = None) -> ParallelModel:
    """This rank's share of the model, built on the meta device and filled from `weights_source`: no rank ever
    holds the whole model (`parallel.parallelize`)."""
    with torch.device("meta"):
        meta = MoEForCausalLM(recipe.moe_config())
    return build_model(meta, layout, recipe.parallel.activation_checkpointing,
                       source=weights_source(recipe, resuming, pieces))


MUON_MODULE = "deepspeed.runtime.zero.muon.original_muon"


def defer_muon_compile() -> None:
    """Import DeepSpeed's Muon kernels with their `torch.compile` deferred to their first call.

    Library gap (DeepSpeed 0.19.8): every ZeRO and BF16 optimizer asks `isinstance(optimizer, MuonWithAuxAdam)`, and
    the module behind that class compiles three Muon kernels when it is imported (`@compiler.compile()`), which loads
    torch inductor: measured 1.4 s of every rank's start on this machine, for an optimizer this project never builds.
    Here the same module is imported with `deepspeed.runtime.compiler.compile` returning a decorator that compiles a
    kernel on its first call instead, so DeepSpeed's classes and checks are its own and Muon, were it ever used,
    still runs compiled. A no-op once the module is loaded."""
    if MUON_MODULE in sys.modules:
        return
    import importlib

    import deepspeed.runtime.compiler as ds_compiler

    def on_first_call():
        def decorate(fn):
            compiled = None

            @functools.wraps(fn)
            def call(*args, **kwargs):
                nonlocal compiled
                if compiled is None:
                    compiled = torch.compile(fn)
                return compiled(*args, **kwargs)
            return call
        return decorate

    eager = ds_compiler.compile
    ds_compiler.compile = on_first_call
    try:
        importlib.import_module(MUON_MODULE)
    finally:
        ds_compiler.compile = eager


def build_engine(recipe: Recipe, layout: Layout, resuming: bool = False, share: ParallelModel | None = None,
                 pieces: Path | None = None):
    """Returns (engine, step function, DeepSpeed JSON config) around `share` (default: `rank_share`, from `pieces`
    where a checkpoint of another layout is resumed)."""
    import deepspeed

    defer_muon_compile()
    torch.manual_seed(recipe.train.seed)  # what else draws (dropout-free model: nothing yet) starts the same
    config = recipe.moe_config()
    model, groups, pipeline_loss = share or rank_share(recipe, layout, resuming, pieces)
    ds_config = deepspeed_config(recipe)
    keep_norm = drops_clipped_norm(recipe)
    engine, _, _, _ = deepspeed.initialize(
        model=model, config={**ds_config, "gradient_clipping": 0.0} if keep_norm else ds_config,  # clip_keeping_norm
        # AutoEP's experts are created inside `initialize`, which re-tags the optimizer groups for them itself
        model_parameters=param_groups(model, recipe.train.weight_decay, layout.ep > 1 and layout.moe_backend == "legacy"),
        mpu=groups.grid if groups is not None and layout.pp == 1 else None)
    keep_fp32(engine.module)  # the score bias, which bf16/fp16 engines cast with the module
    if layout.dp == 1 and layout.pp == 1 and recipe.parallel.zero_stage == 0:
        # one data-parallel rank: DeepSpeed's gradient all-reduce would flatten every gradient into buckets, reduce
        # over a group of one and copy them back (measured: +40% on a 1-rank step at the seed's layer shape)
        engine.enable_backward_allreduce = False
    if keep_norm:
        clip_keeping_norm(engine, recipe.train.grad_clip)
    L, E = len(config.moe_layers), config.num_local_experts  # the step's expert counts: one row per MoE layer
    if layout.pp > 1:
        def step(micro_batches: list[torch.Tensor]) -> StepStats:
            engine.train_batch(data_iter=iter([(ids.to(engine.device), ids.to(engine.device)) for ids in micro_batches]))
            return pipeline_loss.take()
    else:
        def step(micro_batches: list[torch.Tensor]) -> StepStats:
            stats = []
            for ids in micro_batches:
                ids = ids.to(engine.device)
                out = engine(input_ids=ids, labels=ids, use_cache=False)
                engine.backward(out.loss)
                engine.step()
                stats.append(StepStats.of_output(out))
            return StepStats.total(stats, L, E)
    return engine, step, ds_config
