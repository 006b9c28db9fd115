"""Everything DeepSpeed-parallel: groups, tensor-parallel attention, DeepSpeed's MoE layer carrying the project's
experts, and the PipelineModule built from the same blocks. The model files know nothing of this package."""

from .layout import Layout
from .parallelize import build_model

__all__ = ["Layout", "build_model"]
