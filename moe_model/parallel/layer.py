"""One decoder block made parallel in place: the piece both the plain (pp = 1) and the pipeline build use."""

from __future__ import annotations

from ..modeling import MoEDecoderLayer, MoESparseBlock
from .groups import RankGroups


def parallelize_layer(layer: MoEDecoderLayer, groups: RankGroups) -> MoEDecoderLayer:
    """Swap in tensor-parallel attention (tp > 1) and the expert-parallel block, in place: AutoEP's adapter (whose
    block `deepspeed.initialize` converts) on the autoep backend, DeepSpeed's legacy MoE layer where ep > 1. A dense
    FFN layer (`MoEConfig.dense_layers`) keeps its FFN, replicated like attention's norms."""
    layout = groups.layout
    if layout.tp > 1:
        from ..modeling import MoEMLAttention
        from .tensor_parallel import TensorParallelAttention, TensorParallelMLA

        split = TensorParallelMLA if isinstance(layer.self_attn, MoEMLAttention) else TensorParallelAttention
        layer.self_attn = split(layer.self_attn, groups.coords["model"], layout.tp, groups.tp_group)
    if not isinstance(layer.mlp, MoESparseBlock):
        return layer
    if layout.moe_backend == "autoep":
        from .autoep import AutoEPBlock

        layer.mlp = AutoEPBlock(layer.mlp)
    elif layout.ep > 1:
        from .moe_layer import DeepSpeedMoEBlock

        layer.mlp = DeepSpeedMoEBlock(layer.mlp, layout.ep, groups.coords["expert"], layout.tp)
    return layer
