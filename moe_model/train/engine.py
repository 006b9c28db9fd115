"""Recipe + layout -> a DeepSpeed engine and the function that runs one optimizer step on it.

pp == 1: `DeepSpeedEngine` over `MoEForCausalLM` (tp/ep applied in place); pp > 1: `PipelineEngine` over the
`PipelineModule` of the same blocks. Both steps return this rank's `StepStats` (losses and routes per expert of
every layer), summed over its micro-batches, on the CPU; ranks that do not see the loss (earlier pipeline stages)
return zeros, so `StepStats.all_reduce` and `StepStats.mean` give the step's figures on any layout.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..losses import StepStats
from ..modeling import MoEForCausalLM
from ..parallel import Layout, build_model
from ..recipe import Recipe
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
    """Whether DeepSpeed would clip on its fp32 path without ZeRO, which clips the gradients (`clip_fp32_gradients`)
    but drops the norm its `clip_grad_norm_` returns, so `get_global_grad_norm()` says None. The ZeRO and fp16/bf16
    optimizers record the norm themselves."""
    return recipe.train.grad_clip > 0 and recipe.train.precision == "fp32" and recipe.parallel.zero_stage == 0


def clip_keeping_norm(engine, max_norm: float) -> None:
    """Clip as DeepSpeed's fp32 path does and keep the norm: for an engine started with `gradient_clipping` 0.

    Why this way: `deepspeed.initialize` picks the engine class itself (DeepSpeedEngine or PipelineEngine), so an
    engine subclass that keeps the norm cannot be handed to it, and the pipeline engine steps inside `train_batch`,
    where the step function cannot reach. Torch's step pre-hook on the engine's optimizer runs where DeepSpeed's clip
    would (after the gradient all-reduce, just before the optimizer step), clips with DeepSpeed's own
    `clip_grad_norm_` and the engine's arguments, and leaves the norm in the optimizer's `_global_grad_norm`, which
    the engine copies into its own after every step (how its ZeRO and 16-bit optimizers report theirs).
    """
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip(optimizer, args, kwargs) -> None:
        norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=max_norm, mpu=engine.mpu)
        optimizer._global_grad_norm = float(norm)

    engine.optimizer.register_step_pre_hook(clip)


def build_engine(recipe: Recipe, layout: Layout):
    """Returns (engine, step function, DeepSpeed JSON config)."""
    import deepspeed

    torch.manual_seed(recipe.train.seed)
    config = recipe.moe_config()
    model, groups, pipeline_loss = build_model(MoEForCausalLM(config), layout, recipe.parallel.activation_checkpointing)
    ds_config = deepspeed_config(recipe)
    keep_norm = drops_clipped_norm(recipe)
    engine, _, _, _ = deepspeed.initialize(
        model=model, config={**ds_config, "gradient_clipping": 0.0} if keep_norm else ds_config,  # clip_keeping_norm
        model_parameters=param_groups(model, recipe.train.weight_decay, layout.ep > 1),
        mpu=groups.grid if groups is not None and layout.pp == 1 else None)
    if layout.dp == 1 and layout.pp == 1 and recipe.parallel.zero_stage == 0:
        # one data-parallel rank: DeepSpeed's gradient all-reduce would flatten every gradient into buckets, reduce
        # over a group of one and copy them back (measured: +40% on a 1-rank step at the seed's layer shape)
        engine.enable_backward_allreduce = False
    if keep_norm:
        clip_keeping_norm(engine, recipe.train.grad_clip)
    L, E = config.num_hidden_layers, config.num_local_experts
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
