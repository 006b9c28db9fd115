"""Apply a layout to the single-device model: the model files stay unaware of parallelism.

With a `source` (training): the model is built on the meta device, the layout applied there (this rank's attention
heads for tp, its experts inside DeepSpeed's MoE layer or the AutoEP block for ep, its pipeline stage's blocks for
pp), and only then are this rank's parameters allocated and filled from the source by name and slice
(`state_dict_adapter`): no rank ever holds the whole model. The source is the recipe's seed (`SeededInit`: one
stream per parameter and per expert, so every layout gets the same weights and the losses of different layouts are
comparable step for step) or a Hugging Face folder (`train.init_from`). Without a source the given (real) model's
own weights are split as the layout says.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..modeling import MoEForCausalLM
from .groups import RankGroups
from .layer import parallelize_layer
from .layout import Layout
from .state_dict_adapter import Source, materialize, rank_shards


class ParallelModel(NamedTuple):
    """What `build_model` hands back: the module for `deepspeed.initialize`, this rank's groups (None on a plain
    data-parallel layout) and, with pp > 1, the pipeline's loss function (`pipeline.PipelineLoss`, which keeps each
    micro-batch's `StepStats`), else None."""

    module: nn.Module
    groups: RankGroups | None
    pipeline_loss: object | None = None


def build_model(model: MoEForCausalLM, layout: Layout, activation_checkpointing: bool = False,
                source: Source | None = None) -> ParallelModel:
    """This rank's share of `model` under `layout` (see `ParallelModel`); with `source`, `model` is on the meta
    device and this rank's parameters are allocated and read from `source` (module docstring)."""
    if source is None:
        return _apply_layout(model, layout, activation_checkpointing)
    with torch.device("meta"):
        built = _apply_layout(model, layout, activation_checkpointing)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    shards = rank_shards(built.module, layout, model.config, rank)
    materialize(built.module, shards, source)
    return built


def _apply_layout(model: MoEForCausalLM, layout: Layout, activation_checkpointing: bool) -> ParallelModel:
    if (layout.tp, layout.pp, layout.ep, layout.moe_backend) == (1, 1, 1, "legacy"):
        if activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return ParallelModel(model, None)
    groups = RankGroups(layout)
    if layout.pp > 1:
        from .pipeline import build_pipeline_module

        module, loss = build_pipeline_module(model, groups, activation_checkpointing)
        return ParallelModel(module, groups, loss)
    for layer in model.model.layers:
        parallelize_layer(layer, groups)
    if activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return ParallelModel(model, groups)
