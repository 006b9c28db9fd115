"""Apply a layout to the single-device model: the model files stay unaware of parallelism.

Every rank builds the full `MoEForCausalLM` from the recipe's seed, then keeps its share: this rank's attention
heads (tp), its experts inside DeepSpeed's MoE layer (ep), its pipeline stage's blocks (pp). The same weights on
every layout is what makes the losses of different layouts comparable step for step. (For a model that does not fit
one host's memory this would become a meta-device build plus a sharded load; the seed model fits.)
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from ..modeling import MoEForCausalLM
from .groups import RankGroups
from .layer import parallelize_layer
from .layout import Layout


class ParallelModel(NamedTuple):
    """What `build_model` hands back: the module for `deepspeed.initialize`, this rank's groups (None on a plain
    data-parallel layout) and, with pp > 1, the pipeline's loss function (`pipeline.PipelineLoss`, which keeps each
    micro-batch's `StepStats`), else None."""

    module: nn.Module
    groups: RankGroups | None
    pipeline_loss: object | None = None


def build_model(model: MoEForCausalLM, layout: Layout, activation_checkpointing: bool = False) -> ParallelModel:
    """This rank's share of `model` under `layout` (see `ParallelModel`)."""
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
