"""Before launch, with no process group: parameter counts (and, as they land, memory, FLOPs and step time)."""

from .params import ParamCounts, count_params

__all__ = ["ParamCounts", "count_params"]
