"""`moe calibrate RECIPE`: this machine's fp32 matmul rate and memory bandwidth, measured with torch, as hardware
figures the performance model can use; `--from RUN_DIR` refits the efficiency from a finished run's step times.

Measurement (no GPU needed): the matmul rate is 2*n^3 FLOPs per [n, n] x [n, n] fp32 product (n = 1024; the median
of repeated timings after a warm-up), the memory bandwidth is 2 x bytes per `copy_` of a 128 MB fp32 tensor (read +
write; median). The figures are achieved rates, so they are printed as `peak_tflops` / `hbm_bandwidth_tbps` with
`mfu` = `bandwidth_utilization` = 1, and as `--set` overrides to pass to `moe estimate` or `moe plan`.

Refit from a run (`--from RUN_DIR`): the run's recipe (run.json) and the median `step_time_s` of metrics.jsonl
(the first logged step left out: warm-up). One factor f scales both the compute rate (peak x mfu) and the memory rate
(bandwidth x utilisation) until the model's step time equals the measured one (bisection on f; communication is left
as it is); the refitted figures are peak_tflops x f and hbm_bandwidth_tbps x f. A single factor cannot separate
compute from memory or per-kernel launch overheads: on tiny CPU models the overheads dominate, so the refit is what
makes predictions for the next run of a similar shape on the same machine usable, not a statement about peak rates.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

from ..recipe import Recipe, RecipeError, recipe_from_dict
from .perf import performance, shape_of, step_components


def measure_matmul_tflops(n: int = 1024, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e12


def measure_bandwidth_tbps(megabytes: int = 128, repeats: int = 5) -> float:
    import torch

    a = torch.ones(megabytes * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - start)
    return 2 * a.numel() * 4 / statistics.median(times) / 1e12


def measured_step_time(run_dir: Path) -> tuple[float, int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise RecipeError("--from", f"{str(path)!r} does not exist; pass the output_dir of a finished run")
    times = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record.get("step_time_s"), (int, float)):
            times.append(float(record["step_time_s"]))
    if len(times) < 2:
        raise RecipeError("--from", f"{str(path)!r} has fewer than 2 step_time_s records; run a few more steps")
    return statistics.median(times[1:]), len(times) - 1


def run_recipe(run_dir: Path) -> Recipe:
    path = run_dir / "run.json"
    if not path.is_file():
        raise RecipeError("--from", f"{str(path)!r} does not exist; pass the output_dir of a training run")
    raw = json.loads(path.read_text()).get("recipe")
    if not isinstance(raw, dict):
        raise RecipeError("--from", f"{str(path)!r} holds no recipe")
    raw = {k: v for k, v in raw.items() if k not in ("claims",)}
    raw["train"] = {**raw.get("train", {}), "resume": "never"}
    raw["data"] = {"source": "synthetic"}  # the data section does not affect the step-time model
    return recipe_from_dict(raw)


def refit_factor(recipe: Recipe, measured_s: float) -> float:
    """f such that the model's step time with compute and memory rates x f equals `measured_s`."""
    p = recipe.parallel
    dp = p.dp or p.ep
    base = shape_of(recipe)

    def step(f: float) -> float:
        s = dataclasses.replace(base, compute_flops=base.compute_flops * f, hbm_bytes_s=base.hbm_bytes_s * f)
        return float(step_components(s, p.tp, p.pp, p.ep, dp, p.zero_stage, p.micro_batch_size,
                                     p.activation_checkpointing)["step"])

    lo, hi = 1e-9, 1e9
    if step(hi) > measured_s:
        raise RecipeError("--from", f"the measured {measured_s:.4g} s is below what communication alone takes in the "
                                    "model; check the interconnect figures of the run's recipe")
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        if step(mid) > measured_s:
            lo = mid
        else:
            hi = mid
    return (lo * hi) ** 0.5


def cmd_calibrate(recipe: Recipe, args) -> int:
    import torch

    source = getattr(args, "from_run", None)
    out: dict = {"threads": torch.get_num_threads()}
    if source:
        run_dir = Path(source)
        ran = run_recipe(run_dir)
        measured, steps = measured_step_time(run_dir)
        before = performance(ran, dp=ran.parallel.dp or ran.parallel.ep).step_time_s
        f = refit_factor(ran, measured)
        hw = ran.hardware
        overrides = [f"hardware.peak_tflops={hw.peak_tflops * f:.6g}",
                     f"hardware.hbm_bandwidth_tbps={hw.hbm_bandwidth_tbps * f:.6g}"]
        out.update({"run": str(run_dir), "measured_step_time_s": measured, "logged_steps_used": steps,
                    "predicted_before_s": before, "factor": f, "overrides": overrides})
    else:
        tflops, tbps = measure_matmul_tflops(), measure_bandwidth_tbps()
        overrides = [f"hardware.peak_tflops={tflops:.6g}", "hardware.mfu=1",
                     f"hardware.hbm_bandwidth_tbps={tbps:.6g}", "hardware.bandwidth_utilization=1"]
        out.update({"matmul_tflops_fp32": tflops, "memory_bandwidth_tbps": tbps, "overrides": overrides})
    raw = recipe.model_dump()
    calibrated = recipe_from_dict({**raw, "train": {**raw["train"], "resume": "never"},
                                   "data": {"source": "synthetic"}}, overrides)
    p = calibrated.parallel
    out["recipe"] = recipe.name
    out["predicted_step_time_s"] = performance(calibrated, dp=p.dp or p.ep).step_time_s
    if getattr(args, "json", False):
        print(json.dumps(out, indent=2))
        return 0
    if source:
        print(f"{out['run']}: measured {measured:.4g} s per step (median of {steps} logged steps), the model said "
              f"{before:.4g} s; compute and memory rates x {f:.4g}")
    else:
        print(f"this machine ({out['threads']} threads): fp32 matmul {out['matmul_tflops_fp32'] * 1e3:.1f} GFLOP/s, "
              f"memory copy {out['memory_bandwidth_tbps'] * 1e3:.1f} GB/s")
    print("use: " + " ".join(f"--set {o}" for o in overrides))
    print(f"{recipe.name} with these figures: predicted {out['predicted_step_time_s']:.4g} s per step")
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--from", dest="from_run", metavar="RUN_DIR", default=None,
                        help="refit the efficiency from a finished run's metrics.jsonl (and its run.json recipe)")
