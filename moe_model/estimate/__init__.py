"""Before launch, with no process group: parameter counts, memory per rank, the launch guard, FLOPs and step time
(perf.py), the strategy planner (planner.py) and the plan audit (audit.py)."""

from .activations import MicroBatch, StageActivations, model_saved, stage_activations
from .estimate import Estimate, StageEstimate, estimate
from .guard import launch_refusal
from .memory import Assumptions, ModelStates, model_states, stage_layers
from .params import ParamCounts, count_params
from .perf import Performance, performance
from .shapes import RankParams, rank_params

__all__ = [
    "Assumptions", "Estimate", "MicroBatch", "ModelStates", "ParamCounts", "Performance", "RankParams",
    "StageActivations", "StageEstimate", "count_params", "estimate", "launch_refusal", "model_saved", "model_states",
    "performance", "rank_params", "stage_activations", "stage_layers",
]
