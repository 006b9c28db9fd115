"""Apply a layout to the single-device model: the model files stay unaware of parallelism.

Every rank builds the full `MoEForCausalLM` from the recipe's seed, then keeps its share: this rank's attention
heads (tp), its experts inside DeepSpeed's MoE layer (ep), its pipeline stage's blocks (pp). The same weights on
every layout is what makes the losses of different layouts comparable step for step. (For a model that does not fit
one host's memory this would become a meta-device build plus a sharded load; the seed model fits.)
"""

from __future__ import annotations

from functools import cached_property

import torch.distributed as dist
from torch import nn

from ..modeling import MoEDecoderLayer, MoEForCausalLM
from .layout import Layout


class RankGroups:
    """This rank's coordinates and the tensor-parallel group, from DeepSpeed's own topology and grid."""

    def __init__(self, layout: Layout):
        from deepspeed.runtime.pipe.topology import PipelineParallelGrid

        self.layout = layout
        self.rank = dist.get_rank()
        self.coords = layout.coords(self.rank)
        self.grid = PipelineParallelGrid(topology=layout.topology())
        assert self.grid.get_slice_parallel_rank() == self.coords["model"], "rank layout differs from DeepSpeed's"
        assert self.grid.get_data_parallel_id() == self.coords["data"], "rank layout differs from DeepSpeed's"

    @cached_property
    def tp_group(self):
        return self.grid.get_slice_parallel_group()


def parallelize_layer(layer: MoEDecoderLayer, groups: RankGroups) -> MoEDecoderLayer:
    """Swap in tensor-parallel attention (tp > 1) and DeepSpeed's MoE layer (ep > 1), in place."""
    layout = groups.layout
    if layout.tp > 1:
        from .tensor_parallel import TensorParallelAttention

        layer.self_attn = TensorParallelAttention(layer.self_attn, groups.coords["model"], layout.tp, groups.tp_group)
    if layout.ep > 1:
        from .moe_layer import DeepSpeedMoEBlock, install_gloo_gather_shim

        install_gloo_gather_shim()
        layer.mlp = DeepSpeedMoEBlock(layer.mlp, layout.ep, groups.coords["expert"], layout.tp)
    return layer


def build_model(model: MoEForCausalLM, layout: Layout, activation_checkpointing: bool = False
                ) -> tuple[nn.Module, RankGroups | None]:
    """The module to hand to `deepspeed.initialize`, and the groups (None on a plain data-parallel layout)."""
    if (layout.tp, layout.pp, layout.ep) == (1, 1, 1):
        if activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model, None
    groups = RankGroups(layout)
    if layout.pp > 1:
        from .pipeline import build_pipeline_module

        return build_pipeline_module(model, groups, activation_checkpointing), groups
    for layer in model.model.layers:
        parallelize_layer(layer, groups)
    if activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model, groups
