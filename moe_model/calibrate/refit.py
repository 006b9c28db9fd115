"""`moe calibrate RECIPE --from RUN_DIR`: refit the performance model's rates from a finished run.

The run's recipe (run.json, with the hardware figures it ran under) and the median `step_time_s` of its metrics.jsonl
(the first logged step left out: warm-up). f = predicted / measured; the refitted figures are every rate x f (peak,
HBM bandwidth, both links) and the fixed overhead / f, which scales every term of the model alike and reproduces the
run exactly. One run cannot tell which term was off, so none is singled out; a run of the same layout on the same
machine is what the refit is for.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..errors import UsageError
from ..metrics_file import read_metrics
from ..recipe import Recipe, recipe_from_dict
from .predict import hardware_rates, predict_step_s


def _run_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UsageError(f"--from: {str(path)!r} does not exist; pass the output_dir of a finished run")
    return read_metrics(path)


def measured_step_time(run_dir: Path, skip: int = 1) -> tuple[float, int]:
    """Median `step_time_s` of a run's metrics.jsonl, the first `skip` records (warm-up) left out."""
    times = [float(m["step_time_s"]) for m in _run_metrics(run_dir) if isinstance(m.get("step_time_s"), (int, float))]
    if len(times) <= skip:
        raise UsageError(f"--from: {str(run_dir / 'metrics.jsonl')!r} has {len(times)} step_time_s records; run a "
                         "few more steps")
    return statistics.median(times[skip:]), len(times) - skip


def measured_imbalance(run_dir: Path, skip: int = 1) -> float | None:
    """Median over logged steps of the layers' mean busiest-expert load over the mean load (metrics.jsonl's
    `expert_load_max_over_mean_per_layer`); None without such records. It is the step's load over all micro-batches
    and ranks: a single micro-batch's, which sizes DeepSpeed's buffers, is at least as skewed."""
    values = []
    for record in _run_metrics(run_dir):
        layers = record.get("expert_load_max_over_mean_per_layer")
        if layers:
            values.append(sum(layers) / len(layers))
    return statistics.median(values[skip:]) if len(values) > skip else None


def run_recipe(run_dir: Path) -> Recipe:
    """The recipe a run ran (its run.json), with synthetic data and no resume: what its step time is modelled for."""
    path = run_dir / "run.json"
    if not path.is_file():
        raise UsageError(f"--from: {str(path)!r} does not exist; pass the output_dir of a training run")
    raw = json.loads(path.read_text()).get("recipe")
    if not isinstance(raw, dict):
        raise UsageError(f"--from: {str(path)!r} holds no recipe")
    raw = {k: v for k, v in raw.items() if k not in ("claims",)}
    raw["train"] = {**raw.get("train", {}), "resume": "never"}
    raw["data"] = {"source": "synthetic"}  # the data section does not affect the step-time model
    return recipe_from_dict(raw)


def refit_factor(recipe: Recipe, measured_s: float, imbalance: float = 1.0) -> float:
    """f = the model's step time / the measured one: every rate x f and the fixed overhead / f reproduce the run."""
    return predict_step_s(recipe, *hardware_rates(recipe), imbalance=imbalance) / measured_s


def refit_overrides(recipe: Recipe, f: float) -> list[str]:
    """The `--set` overrides that scale every time of the model by 1/f (rates x f, fixed overhead / f)."""
    hw = recipe.hardware
    return [f"hardware.peak_tflops={hw.peak_tflops * f:.6g}", f"hardware.hbm_bandwidth_tbps={hw.hbm_bandwidth_tbps * f:.6g}",
            f"hardware.intra_node_gbps={hw.intra_node_gbps * f:.6g}",
            f"hardware.inter_node_gbps={hw.inter_node_gbps * f:.6g}",
            f"hardware.step_overhead_ms={hw.step_overhead_ms / f:.6g}"]


def refit(run_dir: Path) -> dict:
    """The refit of a finished run: what it measured, what the model said, the factor and the overrides."""
    ran = run_recipe(run_dir)
    measured, steps = measured_step_time(run_dir)
    imbalance = measured_imbalance(run_dir) or 1.0
    before = predict_step_s(ran, *hardware_rates(ran), imbalance=imbalance)
    f = refit_factor(ran, measured, imbalance)
    return {"run": str(run_dir), "measured_step_time_s": measured, "logged_steps_used": steps,
            "routing_imbalance": imbalance, "predicted_before_s": before, "factor": f,
            "overrides": refit_overrides(ran, f)}
