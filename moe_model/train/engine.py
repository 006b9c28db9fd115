"""Recipe + layout -> a DeepSpeed engine and the function that runs one optimizer step on it.

pp == 1: `DeepSpeedEngine` over `MoEForCausalLM` (tp/ep applied in place); pp > 1: `PipelineEngine` over the
`PipelineModule` of the same blocks. Both steps return the same vector per rank, summed over its micro-batches:
`[loss, lm_loss, aux_loss, z_loss, routes per expert of every layer (L*E)]`; ranks that do not see the loss
(earlier pipeline stages) return zeros, so one all-reduce and one division give the step's figures on any layout.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..modeling import MoEForCausalLM
from ..parallel import Layout, build_model
from ..recipe import Recipe
from .ds_config import deepspeed_config

StepFn = Callable[[list[torch.Tensor]], torch.Tensor]


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


def keep_clipped_norm(engine) -> None:
    """DeepSpeed's fp32 path without ZeRO clips the gradients (`clip_fp32_gradients`) but drops the norm its
    `clip_grad_norm_` returns, so `get_global_grad_norm()` said None; keep it. The ZeRO and fp16/bf16 optimizers
    record the norm themselves and never call this method."""
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_fp32_gradients() -> None:
        norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                               mpu=engine.mpu)
        engine._global_grad_norm = float(norm)

    engine.clip_fp32_gradients = clip_fp32_gradients


def build_engine(recipe: Recipe, layout: Layout):
    """Returns (engine, step function, run config of DeepSpeed JSON)."""
    import deepspeed

    torch.manual_seed(recipe.train.seed)
    config = recipe.moe_config()
    model, groups = build_model(MoEForCausalLM(config), layout, recipe.parallel.activation_checkpointing)
    ds_config = deepspeed_config(recipe)
    engine, _, _, _ = deepspeed.initialize(
        model=model, config=ds_config,
        model_parameters=param_groups(model, recipe.train.weight_decay, layout.ep > 1),
        mpu=groups.grid if groups is not None and layout.pp == 1 else None)
    if layout.dp == 1 and layout.pp == 1 and recipe.parallel.zero_stage == 0:
        # one data-parallel rank: DeepSpeed's gradient all-reduce would flatten every gradient into buckets, reduce
        # over a group of one and copy them back (measured: +40% on a 1-rank step at the seed's layer shape)
        engine.enable_backward_allreduce = False
    keep_clipped_norm(engine)
    L, E = config.num_hidden_layers, config.num_local_experts
    if layout.pp > 1:
        loss = model.project_loss

        def step(micro_batches: list[torch.Tensor]) -> torch.Tensor:
            engine.train_batch(data_iter=iter([(ids.to(engine.device), ids.to(engine.device)) for ids in micro_batches]))
            parts = loss.take()
            return torch.stack(parts).sum(0).cpu() if parts else torch.zeros(4 + L * E)
    else:
        blocks = [layer.mlp for layer in engine.module.model.layers]

        def step(micro_batches: list[torch.Tensor]) -> torch.Tensor:
            total = torch.zeros(4 + L * E)
            for ids in micro_batches:
                ids = ids.to(engine.device)
                out = engine(input_ids=ids, labels=ids, use_cache=False)
                engine.backward(out.loss)
                engine.step()
                losses = torch.stack([out.loss, out.lm_loss, out.aux_loss, out.z_loss]).detach().float().cpu()
                load = torch.cat([b.tokens_per_expert.detach().float().cpu() for b in blocks])
                total += torch.cat([losses, load])
            return total
    return engine, step, ds_config
