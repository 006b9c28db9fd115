"""This rank's process groups: coordinates and the tensor-parallel group, from DeepSpeed's own topology and grid.

Setting the groups up is also where the one process-wide change the layout needs is made: with tp > 1 and ep > 1 on
gloo, DeepSpeed's MoE token gather is routed through `moe_layer.install_gloo_gather_shim` (see its docstring).
"""

from __future__ import annotations

from functools import cached_property

import torch.distributed as dist

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
        if layout.tp > 1 and layout.ep > 1 and dist.get_backend() == "gloo":
            from .moe_layer import install_gloo_gather_shim

            install_gloo_gather_shim()

    @cached_property
    def tp_group(self):
        return self.grid.get_slice_parallel_group()
