"""The performance model against the step times of finished CPU runs: prints a table (run, measured, predicted with
this machine's measured rates, predicted after a leave-one-out refit) and writes
benchmarks/results/step_time_accuracy.json.

    .venv/bin/python benchmarks/step_time_accuracy.py [RUN_DIR ...]      # default: every runs/*/ with metrics

Measured: the median `step_time_s` of a run's metrics.jsonl (first logged step left out). Predicted (a): the run's
recipe with this machine's fp32 matmul rate and memory-copy bandwidth (`moe calibrate`, mfu = utilisation = 1).
Predicted (b): the refit factor of `moe calibrate --from` fitted on the *other* runs (geometric mean), applied to
this run: what a previous run on the same machine buys. It starts no training itself: runs come from `make smoke`
and friends, so the runs compared differ in layout and shape only as much as those recipes do.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_model.estimate.calibrate import (measure_bandwidth_tbps, measure_matmul_tflops,  # noqa: E402
                                          measured_step_time, refit_factor, run_recipe)
from moe_model.estimate.perf import shape_of, step_components  # noqa: E402
from moe_model.recipe import RecipeError  # noqa: E402


def predict(recipe, compute_flops: float, hbm_bytes_s: float) -> float:
    p = recipe.parallel
    s = dataclasses.replace(shape_of(recipe), compute_flops=compute_flops, hbm_bytes_s=hbm_bytes_s)
    return float(step_components(s, p.tp, p.pp, p.ep, p.dp or p.ep, p.zero_stage, p.micro_batch_size,
                                 p.activation_checkpointing)["step"])


def main(argv: list[str]) -> int:
    dirs = [Path(a) for a in argv] or sorted(p.parent for p in (ROOT / "runs").glob("*/metrics.jsonl"))
    runs = []
    for d in dirs:
        try:
            recipe = run_recipe(d)
            measured, steps = measured_step_time(d)
        except RecipeError as err:
            print(f"skip {d}: {err}")
            continue
        runs.append({"run": str(d.relative_to(ROOT) if d.is_absolute() and ROOT in d.parents else d),
                     "recipe": recipe, "measured_s": measured, "steps": steps,
                     "factor": refit_factor(recipe, measured)})
    if not runs:
        print("no finished runs with metrics.jsonl and run.json: run `make smoke` first")
        return 1
    tflops, tbps = measure_matmul_tflops(), measure_bandwidth_tbps()
    rows = []
    print(f"this machine: fp32 matmul {tflops * 1e3:.1f} GFLOP/s, copy {tbps * 1e3:.1f} GB/s")
    print(f"{'run':<22}{'layout':<22}{'measured s':>12}{'(a) machine':>13}{'err':>8}{'(b) refit':>12}{'err':>8}")
    for r in runs:
        recipe, p = r["recipe"], r["recipe"].parallel
        a = predict(recipe, tflops * 1e12, tbps * 1e12)
        others = [o["factor"] for o in runs if o is not r]
        b = None
        if others:
            f = math.exp(sum(math.log(x) for x in others) / len(others))
            s = shape_of(recipe)
            b = predict(recipe, s.compute_flops * f, s.hbm_bytes_s * f)
        layout = f"tp{p.tp} pp{p.pp} ep{p.ep} dp{p.dp}"
        err_a = a / r["measured_s"] - 1
        err_b = None if b is None else b / r["measured_s"] - 1
        print(f"{r['run']:<22}{layout:<22}{r['measured_s']:>12.4f}{a:>13.4f}{err_a:>8.0%}"
              + (f"{b:>12.4f}{err_b:>8.0%}" if b is not None else f"{'-':>12}{'-':>8}"))
        rows.append({"run": r["run"], "layout": layout, "measured_step_time_s": r["measured_s"],
                     "predicted_machine_rates_s": a, "error_machine_rates": err_a,
                     "predicted_leave_one_out_refit_s": b, "error_leave_one_out_refit": err_b,
                     "refit_factor": r["factor"]})
    out = ROOT / "benchmarks/results/step_time_accuracy.json"
    out.write_text(json.dumps({"matmul_tflops_fp32": tflops, "memory_bandwidth_tbps": tbps, "runs": rows},
                              indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
