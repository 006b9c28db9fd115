"""Published GPU measurements of MoE training beside the performance model's prediction for DeepSpeed.

    .venv/bin/python benchmarks/published_runs.py [--mfu 0.7] [--json]

Every row of `published_runs_data.RUNS` (sources, dates and what was inferred are stated there) becomes a recipe:
the model as published, the layout (tp, pp, ep, dp, micro-batch, global batch, sequence), bf16, ZeRO-1 (Megatron's
distributed optimizer shards the optimizer states as ZeRO-1 does), activation checkpointing where the source
recomputes, routing balanced (`imbalance` 1: the NVIDIA benchmarks force balanced routing on mock data; a row with
natural routing says so), and `hardware.gpu` the source's card with `hardware.mfu` (default 0.7, the large-GEMM
efficiency a user would state). Two predictions for each: "one efficiency", every GEMM at `mfu` and no kernel cost
(the class's datasheet figures, the GEMM-shape figures off: `devices.FLAT`), and "by shape", the class's shape
figures on (`estimate.kernels`). Measured step time: the source's own, else its tokens/s, else its TFLOPS/GPU
converted with this project's model FLOPs per token (`perf.model_flops_per_step`: the causal count, which equals
Megatron-Core's `num_floating_point_operations` to 0.3% on every model here).

Megatron-Core overlaps its expert and data-parallel communication with compute and DeepSpeed does not (perf.py's
stated assumption), so a faithful prediction for DeepSpeed is not faster than the measurement: ratio = predicted /
measured >= 1 on every row the project can express. A row it cannot express (a layout rule, virtual pipeline stages,
FP8, a card without a class) gets the reason; where only virtual stages stand in the way, the same layout without them
is predicted (a larger bubble: a prediction for it may only be slower) and shown in brackets, outside the check.
Writes benchmarks/results/published_runs.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from published_runs_data import RUNS, PublishedRun  # noqa: E402

from moe_model.devices import FLAT, GPU_CLASSES  # noqa: E402
from moe_model.estimate.perf import model_flops_per_step, performance, shape_of  # noqa: E402
from moe_model.recipe import RecipeError, recipe_from_dict  # noqa: E402

RESULTS = ROOT / "benchmarks/results/published_runs.json"
CARDS = {"h100_sxm": "h100_sxm", "h800": "h800_sxm", "h200_sxm": "h200_sxm", "a100_sxm": "a100_sxm"}


def recipe_of(run: PublishedRun, mfu: float, by_shape: bool):
    hardware = {"gpu": CARDS[run.gpu], "mfu": mfu, "gpu_memory_gb": 1e6}  # time only: memory is not the question
    if not by_shape:
        hardware.update(FLAT)
    return recipe_from_dict({
        "name": run.name,
        "model": run.model,
        "parallel": {"tp": run.tp, "pp": run.pp, "ep": run.ep, "dp": run.dp, "micro_batch_size": run.micro_batch,
                     "zero_stage": 1, "activation_checkpointing": run.recompute not in ("none", "not stated")},
        "train": {"global_batch_size": run.global_batch, "seq_len": run.seq_len, "precision": "bf16"},
        "hardware": hardware,
    })


def measured_step_s(run: PublishedRun) -> tuple[float, str]:
    """The source's step time, else from its tokens/s, else from its TFLOPS/GPU (this project's FLOP count)."""
    if run.measured_step_s:
        return run.measured_step_s, "stated"
    tokens = run.global_batch * run.seq_len
    if run.measured_tokens_per_s_per_gpu:
        return tokens / (run.measured_tokens_per_s_per_gpu * run.gpus), "tokens/s"
    probe = recipe_from_dict({"name": "flops", "model": run.model, "parallel": {"pp": 1, "ep": 1},
                              "train": {"global_batch_size": run.global_batch, "seq_len": run.seq_len}})
    flops = model_flops_per_step(shape_of(probe))
    return flops / (run.measured_tflops_per_gpu * 1e12 * run.gpus), "TFLOPS"


def row(run: PublishedRun, mfu: float) -> dict:
    measured, how = measured_step_s(run)
    out = {"name": run.name, "source": run.source, "date": run.date, "gpu": run.gpu, "gpus": run.gpus,
           "layout": f"tp{run.tp} pp{run.pp} ep{run.ep} dp{run.dp}" + (f" vpp{run.vpp}" if run.vpp > 1 else ""),
           "measured_tflops_per_gpu": run.measured_tflops_per_gpu, "measured_step_s": measured,
           "measured_from": how, "not_expressible": run.not_expressible, "inferred": run.inferred}
    only_vpp = run.not_expressible and run.vpp > 1 and run.not_expressible.startswith("interleaved virtual pipeline")
    if run.gpu not in CARDS or (run.not_expressible and not only_vpp):
        return out
    try:
        flat, shaped = (performance(recipe_of(run, mfu, by_shape), imbalance=1.0) for by_shape in (False, True))
    except RecipeError as e:
        out["not_expressible"] = f"{run.not_expressible + '; ' if run.not_expressible else ''}{e}"
        return out
    out.update(predicted_one_efficiency_s=flat.step_time_s, predicted_by_shape_s=shaped.step_time_s,
               ratio=shaped.step_time_s / measured, moe_backend=shaped.moe_backend,
               breakdown_s=shaped.breakdown, per_micro_batch_s=shaped.per_micro_batch,
               checked=run.not_expressible is None)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.7, help="hardware.mfu: a large GEMM's efficiency (0.7)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    args = parser.parse_args(argv)
    rows = [row(run, args.mfu) for run in RUNS]
    RESULTS.write_text(json.dumps({"mfu": args.mfu, "classes": GPU_CLASSES, "rows": rows}, indent=2) + "\n")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"hardware.mfu {args.mfu}; predictions for DeepSpeed, routing balanced; measured = the source's run")
    print(f"{'run':<70}{'gpus':>5}  {'layout':<24}{'TFLOPS':>7}{'measured s':>11}{'one eff. s':>11}"
          f"{'by shape s':>11}{'ratio':>7}")
    for r in rows:
        tflops = f"{r['measured_tflops_per_gpu']:.1f}" if r["measured_tflops_per_gpu"] else "-"
        start = f"{r['name'][:69]:<70}{r['gpus']:>5}  {r['layout']:<24}{tflops:>7}{r['measured_step_s']:>11.3f}"
        if "predicted_by_shape_s" not in r:
            print(f"{start}   not expressible: {r['not_expressible']}")
            continue
        ratio = f"{r['ratio']:.2f}" if r["checked"] else f"({r['ratio']:.2f})"
        print(f"{start}{r['predicted_one_efficiency_s']:>11.3f}{r['predicted_by_shape_s']:>11.3f}{ratio:>7}"
              + ("" if r["checked"] else f"   nearest layout: {r['not_expressible']}"))
    checked = [r for r in rows if r.get("checked")]
    faster = [r["name"] for r in checked if r["ratio"] < 1]
    print(f"{len(checked)} expressible rows: " + (f"{len(faster)} predicted faster than measured: {faster}" if faster
                                                   else "none predicted faster than measured"))
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 1 if faster else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
