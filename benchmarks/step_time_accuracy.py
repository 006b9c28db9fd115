"""The performance model against measured CPU runs of the tiny recipes: calibrate, train, compare.

    .venv/bin/python benchmarks/step_time_accuracy.py [--steps 60] [--cases tiny-cpu-1rank,tiny-cpu-4ranks,...]

For each case, in one go and in this order: (1) `moe calibrate` on the case's recipe (this machine's matmul rate and
copy bandwidth, one rank's forward + backward timed to fit the efficiency, and the fixed cost of a step measured by
training a shrunken copy of the layout; see moe_model/calibrate/machine.py), which gives the predicted step time;
(2) the real recipe trained for `--steps` steps through the deepspeed launcher with those calibrated hardware figures
(so its run.json records them); measured = median `step_time_s`, the first 2 steps left out. The run is repeated (a, b):
`moe calibrate --from` refits the rates from run a, and that prediction is checked against run b (what a finished
run adds for the next one on the same machine); the two runs also show how much this machine's step times wander.
Prints the table and writes benchmarks/results/step_time_accuracy.json (the cases run replace their rows, the others
stay). Each case takes about two minutes here; nothing else should run meanwhile. The 2-rank cases put the MoE
backends side by side at dp2 x ep2 (legacy, AutoEP at ZeRO-1 and at ZeRO-3).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_model.calibrate import (hardware_rates, measure_machine, measured_imbalance, measured_step_time,  # noqa: E402
                                 predict_step_s, refit_factor, refit_overrides, run_recipe)
from moe_model.recipe import load_recipe, recipe_from_dict  # noqa: E402
from moe_model.strategy import Strategy  # noqa: E402

ONE_RANK = ("parallel.pp=1", "parallel.ep=1", "parallel.dp=null", "parallel.zero_stage=0")
FINE_GRAINED = ("model.num_local_experts=32", "model.num_experts_per_tok=8", "model.moe_intermediate_size=32")
CASES = {
    "tiny-cpu-1rank": ("recipes/tiny_cpu.yaml", ONE_RANK),
    "tiny-cpu-4ranks": ("recipes/tiny_cpu.yaml", ()),  # pp2 x dp2, experts over ep2, ZeRO-1: make smoke's layout
    "tiny-text-4ranks": ("recipes/tiny_text.yaml", ()),  # make smoke itself: real text, BPE of 2048, sequences of 128
    # dp2 x ep2 on each MoE backend, and AutoEP under ZeRO-3 (its parameter gathers and per-micro-batch reduce-scatter)
    "tiny-cpu-2ranks-legacy": ("recipes/tiny_cpu.yaml", ("parallel.pp=1", "parallel.moe_backend=legacy")),
    "tiny-cpu-2ranks-autoep": ("recipes/tiny_cpu.yaml", ("parallel.pp=1", "parallel.moe_backend=autoep")),
    "tiny-cpu-2ranks-autoep-zero3": ("recipes/tiny_cpu.yaml", ("parallel.pp=1", "parallel.moe_backend=autoep",
                                                               "parallel.zero_stage=3")),
    # fine-grained experts (issue 27): 32 experts of width 32, top-8, the same active FFN width as tiny_cpu's 8 of 128,
    # top-2, so four times the routed rows in GEMMs a quarter as wide
    "tiny-fine-grained-1rank": ("recipes/tiny_cpu.yaml", ONE_RANK + FINE_GRAINED),
    "tiny-fine-grained-2ranks-autoep": ("recipes/tiny_cpu.yaml", ("parallel.pp=1", "parallel.moe_backend=autoep")
                                        + FINE_GRAINED),
}
RESULTS = ROOT / "benchmarks/results/step_time_accuracy.json"


def train(recipe_path: str, overrides: list[str], steps: int, out: Path) -> None:
    sets = [*overrides, f"train.steps={steps}", "train.log_every=1", "train.save_every=0", "train.eval_every=0",
            "train.resume=never", f"train.output_dir={out}", "tracking.wandb.mode=disabled"]
    command = [sys.executable, "-m", "moe_model.cli", "train", recipe_path]
    for s in sets:
        command += ["--set", s]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    if done.returncode != 0:
        raise SystemExit(f"training {recipe_path} failed:\n{done.stderr[-2000:]}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args(argv)
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    corpus = ROOT / "data/python_docs.jsonl"
    if "tiny-text-4ranks" in names and not corpus.is_file():  # what `make smoke` builds first (no download)
        subprocess.run([sys.executable, str(ROOT / "scripts/build_corpus.py"), "-o", str(corpus)], check=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="step-time-") as tmp:
        for name in names:
            path, overrides = CASES[name]
            recipe = load_recipe(ROOT / path, list(overrides))
            print(f"{name}: calibrating", flush=True)
            calibration = measure_machine(recipe)
            calibrated = load_recipe(ROOT / path, list(overrides) + calibration["overrides"])
            skew = calibration["routing_imbalance"]  # what the timed rank work routed like (per micro-batch)
            predicted = predict_step_s(calibrated, *hardware_rates(calibrated), imbalance=skew)
            measured = []
            for run in ("a", "b"):
                print(f"{name}: training run {run}, {args.steps} steps", flush=True)
                run_dir = Path(tmp, f"{name}-{run}")
                train(path, list(overrides) + calibration["overrides"], args.steps, run_dir)
                measured.append(measured_step_time(run_dir, skip=2)[0])
                if run == "a":  # what `moe calibrate --from RUN_DIR` refits from run a, to predict run b
                    ran = run_recipe(run_dir)
                    run_skew = measured_imbalance(run_dir) or 1.0
                    f = refit_factor(ran, measured[0], run_skew)
                    refitted = recipe_from_dict(ran.model_dump(), refit_overrides(ran, f))
                    refit = predict_step_s(refitted, *hardware_rates(refitted), imbalance=run_skew)
            p = recipe.parallel
            backend = Strategy.from_recipe(recipe)[0].moe_backend
            rows.append({"case": name, "layout": f"tp{p.tp} pp{p.pp} ep{p.ep} dp{p.dp or 1} zero{p.zero_stage} {backend}",
                         "ranks": calibration["ranks"], "measured_run_a_s": measured[0], "measured_run_b_s": measured[1],
                         "predicted_calibrated_s": predicted, "error_calibrated_a": predicted / measured[0] - 1,
                         "error_calibrated_b": predicted / measured[1] - 1, "refit_factor_from_a": f,
                         "predicted_refit_from_a_s": refit, "error_refit_b": refit / measured[1] - 1,
                         "routing_imbalance_calibrated": skew, "routing_imbalance_logged_run_a": run_skew,
                         "calibration": calibration})
    print(f"\n{'case':<29}{'layout':<31}{'run a s':>9}{'run b s':>9}{'calibrated s':>14}{'err a':>7}{'err b':>7}"
          f"{'refit(a) s':>12}{'err b':>7}")
    for r in rows:
        print(f"{r['case']:<29}{r['layout']:<31}{r['measured_run_a_s']:>9.4f}{r['measured_run_b_s']:>9.4f}"
              f"{r['predicted_calibrated_s']:>14.4f}{r['error_calibrated_a']:>7.0%}{r['error_calibrated_b']:>7.0%}"
              f"{r['predicted_refit_from_a_s']:>12.4f}{r['error_refit_b']:>7.0%}")
        c = r["calibration"]
        print(f"  calibrated: {c['threads_per_rank']} thread(s)/rank, matmul {c['matmul_tflops_fp32'] * 1e3:.1f} "
              f"GFLOP/s, copy {c['memory_bandwidth_tbps'] * 1e3:.1f} GB/s, mfu {c['mfu']:.3f}, fixed "
              f"{c['step_overhead_s'] * 1e3:.1f} ms/step, routing skew {r['routing_imbalance_calibrated']:.2f} "
              f"(run a logged, step-aggregated: {r['routing_imbalance_logged_run_a']:.2f})")
    # the cases run now replace their earlier rows; the others' rows stay (each row records its own steps)
    earlier = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for r in rows:
        r["steps"] = args.steps
    kept = [{**r, "steps": r.get("steps", earlier.get("steps"))} for r in earlier.get("cases", [])
            if r["case"] not in names]
    RESULTS.write_text(json.dumps({"cases": kept + rows}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
