"""`moe calibrate RECIPE [--from RUN_DIR] [--no-overhead]`: this machine's figures (calibrate/machine.py) or a
finished run's refit (calibrate/refit.py), printed with the `--set` overrides that apply them."""

from __future__ import annotations

import argparse
import json
import sys

from ..recipe import Recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="from_run", metavar="RUN_DIR", default=None,
                        help="refit the efficiency from a finished run's metrics.jsonl (and its run.json recipe)")
    parser.add_argument("--no-overhead", action="store_true",
                        help="skip the shrunken training run that measures the fixed cost of a step (no launcher)")


def cmd_calibrate(recipe: Recipe, args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..calibrate import calibrated_prediction, measure_machine, refit

    source = getattr(args, "from_run", None)
    as_json = getattr(args, "json", False)
    if source:
        out = refit(Path(source))
    else:
        log = None if as_json else (lambda message: print(f"moe calibrate: {message}", file=sys.stderr, flush=True))
        out = measure_machine(recipe, overhead=not getattr(args, "no_overhead", False), log=log)
    overrides = out["overrides"]
    out["recipe"] = recipe.name
    imbalance = out.get("routing_imbalance") or 1.0
    out["predicted_step_time_s"] = calibrated_prediction(recipe, overrides, imbalance)
    if as_json:
        print(json.dumps(out, indent=2))
        return 0
    if source:
        print(f"{out['run']}: measured {out['measured_step_time_s']:.4g} s per step (median of "
              f"{out['logged_steps_used']} logged steps), the model said {out['predicted_before_s']:.4g} s; every "
              f"rate x {out['factor']:.4g}, the fixed overhead / {out['factor']:.4g}")
    else:
        print(f"this machine, {out['threads_per_rank']} thread(s) per rank for {out['ranks']} rank(s): fp32 matmul "
              f"{out['matmul_tflops_fp32'] * 1e3:.1f} GFLOP/s (n = 1024), memory copy "
              f"{out['memory_bandwidth_tbps'] * 1e3:.1f} GB/s; one rank's forward + backward "
              f"{out['rank_forward_backward_s'] * 1e3:.2f} ms ({out['shrunken_forward_backward_s'] * 1e3:.2f} ms of it "
              f"at shrunken widths): mfu {out['mfu']:.3f}")
        print_gemm_table(out["gemm_table"])
        if "step_overhead_s" in out:
            print(f"fixed cost of a step on this layout: {out['step_overhead_s'] * 1e3:.1f} ms (shrunken model: "
                  f"{out['shrunken_step_time_s'] * 1e3:.1f} ms measured, {out['shrunken_arithmetic_s'] * 1e3:.2f} ms "
                  "of it arithmetic)")
    print("use: " + " ".join(f"--set {o}" for o in overrides)
          + (f" (moe estimate: --imbalance {imbalance:.3g}, the routing skew seen)" if recipe.parallel.ep > 1 else ""))
    print(f"{recipe.name} with these figures: predicted {out['predicted_step_time_s']:.4g} s per step")
    return 0


def print_gemm_table(gemms: dict) -> None:
    """The measured GEMM table beside the one-efficiency roofline and the fitted GEMM-by-shape time."""
    tm, tn = gemms["gemm_tile"]
    print(f"GEMM table (fp32, median): fitted {gemms['sm_count']} units, tile {tm} x {tn}, K at half rate "
          f"{gemms['gemm_k_half']:g}, rate {gemms['gemm_rate_flops'] / 1e9:.1f} GFLOP/s, one kernel "
          f"{gemms['kernel_launch_us']:.2f} us measured; rms log error {gemms['rms_log_error']:.3f} by shape, "
          f"{gemms['one_efficiency_rms_log_error']:.3f} at one efficiency (its best rate, "
          f"{gemms['one_efficiency_rate_flops'] / 1e9:.1f} GFLOP/s)")
    print(f"  {'GEMM':<44}{'M':>7}{'N':>6}{'K':>6}{'groups':>7}{'measured us':>13}{'GFLOP/s':>9}"
          f"{'one eff. us':>13}{'by shape us':>13}")
    for r in gemms["rows"]:
        print(f"  {r['gemm'][:43]:<44}{r['M']:>7.0f}{r['N']:>6}{r['K']:>6}{r['groups']:>7}{r['measured_s'] * 1e6:>13.1f}"
              f"{r['measured_gflops']:>9.1f}{r['one_efficiency_s'] * 1e6:>13.1f}{r['by_shape_s'] * 1e6:>13.1f}")
