"""The whole memory estimate of a recipe: every pipeline stage's rank, the peak rank, and whether it fits.

Per rank of stage s (all tp/ep/dp ranks of a stage hold the same amounts):
    allocated  = params + grads + optimizer                                     (memory.py)
               + max(activations + imbalance headroom + gradient bucket + loss-head gradients,   at the backward
                     optimizer-step transients)                                                  at the step
    total      = allocated * (1 + fragmentation) + reserve
`other_bytes` is everything in `total` that is not params, grads, optimizer, activations or headroom: the bucket,
the loss-head gradient buffers (or the step transients where the step is the peak), fragmentation and the reserve.
`activations_bytes` follows DESIGN.md: what autograd holds for backward at the peak with balanced routing
(activations.py), plus the logits and pipeline buffers the step keeps alive through backward.

The budget is `hardware.gpu_memory_gb * 1e9` bytes (decimal GB: a little below what a "64 GB" GPU reports, on
the safe side). dp comes from, in order: the world size at launch, `parallel.dp`, else the smallest legal dp
(= ep) and the report says it was assumed (`Strategy.resolved`). The MoE backend is the strategy's, `auto` resolved
by `Strategy.with_backend` as the launch resolves it (the JSON's `layout.moe_backend`): AutoEP's activations and
ZeRO-3's gathered parameters follow from it. `peak_total` is the one formula of a rank's total at its peak; the
planner's fast path calls it on arrays.

Step time, throughput and MFU come from the performance model (perf.py) for the same layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..recipe import Recipe
from ..strategy import Strategy
from ..units import GB
from .activations import MicroBatch, StageActivations, stage_activations
from .memory import (PRECISION_BYTES, Assumptions, ModelStates, model_states, stage_ranges, zero2_gradient_elements,
                     zero3_residency, zero_flat_groups)
from .params import ParamCounts, count_params
from .shapes import RankParams, rank_params, unpriced_settings


@dataclass(frozen=True)
class StageEstimate:
    stage: int
    first_rank: int
    ranks: int  # ranks in this stage (tp * dp); each peaks alike
    layers: int
    in_flight: int
    params: RankParams
    states: ModelStates
    activations: StageActivations
    fragmentation_bytes: int
    reserve_bytes: int
    peak_at: str  # "backward" or "optimizer step"
    total_bytes: int

    @property
    def params_bytes(self) -> int:
        return self.states.params_bytes

    @property
    def grads_bytes(self) -> int:
        return self.states.grads_bytes

    @property
    def optimizer_bytes(self) -> int:
        return self.states.optimizer_bytes

    @property
    def activations_bytes(self) -> int:
        return self.activations.activations_bytes

    @property
    def imbalance_headroom_bytes(self) -> int:
        return self.activations.imbalance_headroom_bytes

    @property
    def other_bytes(self) -> int:
        return (self.total_bytes - self.params_bytes - self.grads_bytes - self.optimizer_bytes
                - self.activations_bytes - self.imbalance_headroom_bytes)

    def consumers(self) -> dict[str, int]:
        """Every term of `total_bytes`, finer than the JSON's six: what the launch guard ranks."""
        backward = self.peak_at == "backward"
        parts = {
            "parameters": self.params_bytes,
            "gradients": self.grads_bytes,
            "optimizer states (fp32 master + Adam)": self.optimizer_bytes,
            "activations": self.activations_bytes,
            "routing-imbalance headroom": self.imbalance_headroom_bytes,
            "gradient reduction bucket": self.states.bucket_bytes if backward else 0,
            "loss-head gradient buffers": self.activations.head_transient_bytes if backward else 0,
            "optimizer-step transients": 0 if backward else self.states.step_transient_bytes,
            "allocator fragmentation": self.fragmentation_bytes,
            "CUDA context and communicator reserve": self.reserve_bytes,
        }
        return {name: value for name, value in parts.items() if value}

    def summary(self) -> dict[str, int]:
        return {"params_bytes": self.params_bytes, "grads_bytes": self.grads_bytes,
                "optimizer_bytes": self.optimizer_bytes, "activations_bytes": self.activations_bytes,
                "imbalance_headroom_bytes": self.imbalance_headroom_bytes, "other_bytes": self.other_bytes,
                "total_bytes": self.total_bytes}


@dataclass(frozen=True)
class Estimate:
    recipe: str
    counts: ParamCounts
    strategy: Strategy  # dp resolved
    dp_assumed: bool
    micro_steps: int  # micro-batches per optimizer step on each data-parallel rank
    precision: str
    stages: list[StageEstimate]
    budget_bytes: int
    assumptions: Assumptions
    performance: object = None  # perf.Performance of the same layout
    unpriced: tuple[str, ...] = ()  # block settings memory and time do not price yet (`shapes.unpriced_settings`)

    tp = property(lambda self: self.strategy.tp)
    pp = property(lambda self: self.strategy.pp)
    ep = property(lambda self: self.strategy.ep)
    dp = property(lambda self: self.strategy.dp)
    zero_stage = property(lambda self: self.strategy.zero_stage)

    @property
    def gpus(self) -> int:
        return self.strategy.gpus

    @property
    def peak(self) -> StageEstimate:
        return max(self.stages, key=lambda s: s.total_bytes)

    @property
    def fits(self) -> bool:
        return self.peak.total_bytes <= self.budget_bytes

    def as_json(self) -> dict:
        """DESIGN.md's `moe estimate` keys, then the per-stage table, the layout and the assumptions."""
        peak = self.peak
        return {
            "params": {"total": self.counts.total, "active_per_token": self.counts.active_per_token},
            "gpus": self.gpus,
            "peak_rank": {"rank": peak.first_rank, "stage": peak.stage, **peak.summary()},
            "budget_bytes": self.budget_bytes,
            "fits": self.fits,
            "step_time_s": self.performance.step_time_s if self.performance else None,
            "throughput_seq_per_s": self.performance.throughput_seq_per_s if self.performance else None,
            "mfu": self.performance.mfu if self.performance else None,
            "performance": self.performance.as_json() if self.performance else None,
            "recipe": self.recipe,
            "layout": {"tp": self.tp, "pp": self.pp, "ep": self.ep, "dp": self.dp, "dp_assumed": self.dp_assumed,
                       "zero_stage": self.zero_stage, "moe_backend": self.strategy.moe_backend,
                       "precision": self.precision,
                       "micro_batches_per_step": self.micro_steps},
            "stages": [{"stage": s.stage, "first_rank": s.first_rank, "ranks": s.ranks, "layers": s.layers,
                        "in_flight_micro_batches": s.in_flight, "peak_at": s.peak_at,
                        "optimizer": s.states.optimizer_kind, **s.summary()} for s in self.stages],
            "assumptions": asdict(self.assumptions),
            "unpriced_block_settings": list(self.unpriced),
        }


def estimate(recipe: Recipe, world_size: int | None = None, assumptions: Assumptions = Assumptions(),
             strategy: Strategy | None = None) -> Estimate:
    """The memory of every pipeline stage's rank for `recipe` on `world_size` GPUs (dp: `Strategy.resolved`), or for
    another `strategy` of the same model (dp set). A strategy that breaks a layout rule is a `RecipeError`."""
    if strategy is None:
        strategy, dp_assumed = recipe.strategy(world_size)
    else:
        recipe.check_strategy(strategy)
        dp_assumed = False
    strategy = strategy.with_backend(recipe.model)  # the MoE backend the run would take (auto resolved)
    t, tp, pp, ep, dp = recipe.train, strategy.tp, strategy.pp, strategy.ep, strategy.dp
    micro_steps = strategy.micro_batches(t.global_batch_size)
    cfg = recipe.moe_config()
    autoep = strategy.moe_backend == "autoep"
    mb = MicroBatch(strategy.micro_batch_size, t.seq_len, PRECISION_BYTES[t.precision], tp=tp, ep=ep,
                    moe_backend=strategy.moe_backend, triton=assumptions.autoep_triton_kernels)
    stages = []
    for s, held in enumerate(stage_ranges(cfg.num_hidden_layers, pp)):
        first, last, layers = s == 0, s == pp - 1, len(held)
        params = rank_params(cfg, layers=held, first=first, last=last, tp=tp, ep=ep)
        zero3 = (zero3_residency(cfg, layers=layers, first=first, last=last, tp=tp, ep=ep, autoep=autoep,
                                 checkpointing=strategy.activation_checkpointing, assumptions=assumptions)
                 if strategy.zero_stage == 3 else None)
        zero2 = (zero2_gradient_elements(zero_flat_groups(cfg, layers=held, first=first, last=last, tp=tp, ep=ep,
                                                          autoep=autoep), dp=dp, ep=ep)
                 if strategy.zero_stage == 2 else None)
        states = model_states(params, precision=t.precision, zero_stage=strategy.zero_stage, dp=dp, ep=ep, pp=pp,
                              assumptions=assumptions, zero3=zero3, zero2_gradients=zero2)
        in_flight = min(micro_steps, pp - s)
        acts = stage_activations(cfg, mb, layers=held, first=first, last=last, pp=pp, in_flight=in_flight,
                                 checkpointing=strategy.activation_checkpointing, imbalance=assumptions.imbalance)
        stages.append(stage_estimate(s, dp * tp, layers, in_flight, params, states, acts, assumptions))
    from .perf import performance

    return Estimate(recipe=recipe.name, counts=count_params(cfg), strategy=strategy, dp_assumed=dp_assumed,
                    micro_steps=micro_steps, precision=t.precision, stages=stages,
                    budget_bytes=budget_bytes(recipe), assumptions=assumptions,
                    performance=performance(recipe, strategy=strategy, imbalance=assumptions.imbalance),
                    unpriced=tuple(unpriced_settings(cfg)))


def budget_bytes(recipe: Recipe) -> int:
    """The memory a rank may use: `hardware.gpu_memory_gb` in decimal GB."""
    return int(recipe.hardware.gpu_memory_gb * GB)


def peak_total(model_states_bytes, bucket_bytes, step_transient_bytes, activation_peak_bytes,
               assumptions: Assumptions):
    """(allocated, fragmentation, total) bytes of a rank at its peak, the larger of the backward pass (activations,
    headroom and loss-head buffers: `activation_peak_bytes`, plus the gradient bucket) and the optimizer step; on
    numbers or numpy arrays (the planner). `model_states_bytes` = params + grads + optimizer."""
    allocated = model_states_bytes + np.maximum(activation_peak_bytes + bucket_bytes, step_transient_bytes)
    if np.ndim(allocated) == 0:
        allocated = int(allocated)
        fragmentation = int(allocated * assumptions.fragmentation)
    else:
        fragmentation = (allocated * assumptions.fragmentation).astype(np.int64)
    return allocated, fragmentation, allocated + fragmentation + assumptions.reserve_bytes


def stage_estimate(stage: int, ranks: int, layers: int, in_flight: int, params: RankParams, states: ModelStates,
                   acts: StageActivations, assumptions: Assumptions) -> StageEstimate:
    at_backward = acts.backward_peak_bytes
    _, fragmentation, total = peak_total(states.params_bytes + states.grads_bytes + states.optimizer_bytes,
                                         states.bucket_bytes, states.step_transient_bytes, at_backward, assumptions)
    return StageEstimate(
        stage=stage, first_rank=stage * ranks, ranks=ranks, layers=layers, in_flight=in_flight, params=params,
        states=states, activations=acts, fragmentation_bytes=fragmentation, reserve_bytes=assumptions.reserve_bytes,
        peak_at="backward" if at_backward + states.bucket_bytes >= states.step_transient_bytes else "optimizer step",
        total_bytes=total,
    )
