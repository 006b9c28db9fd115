"""`make gpu-check`: the one script a session lent a GPU runs first (under 8 minutes on one GPU).

    .venv/bin/python scripts/gpu_check.py                      # on a GPU machine; --peak-tflops 989 (H100/H200)
    .venv/bin/python scripts/gpu_check.py --peak-tflops 312    # the card's dense bf16 peak (A100: 312)

Three parts, each in its own process with its own time limit (and all of them within `TOTAL_LIMIT_S`):

- train: `moe train recipes/gpu_check.yaml` (a small gated-silu model, bf16, world size 1) once per MoE backend:
  `legacy` (ep 1: the model's own block) and `autoep` (DeepSpeed's AutoEP at autoep_size 1). Checked: the run
  exits 0, its run.json names the backend (and, for autoep, an enabled `expert_parallel` section), every logged loss
  is finite and the last is below the first; figures: tokens/s, MFU (the trainer's own, against `--peak-tflops`),
  step time (medians over the last half of the steps) and the peak memory the trainer logs
  (`torch.cuda.max_memory_allocated`). Across backends: the first step's losses (same weights, same batch) agree
  within `LOSS_AGREEMENT[precision]`.
- memory: benchmarks/memory_accuracy.py's GPU program (`--measure-gpu`, one rank): the estimator against
  `torch.cuda.max_memory_allocated` over a training step, with the error.
- speed: benchmarks/moe_speed.py `--device cuda --peak-tflops P` (bf16): tokens/s and MFU of the model's training
  step at the seed layer shape, its speed against transformers' Mixtral, DeepSpeed's 1-rank engine against the bare
  model; the figures are the bench's own (`moe_speed.mixtral_rows`).

It prints one table and writes JSON (benchmarks/results/gpu_check.json, or --out); every part's log is kept in
runs/gpu-check/. A part that fails or runs out of time is a row saying so; the exit status is then 1.
On a machine without CUDA it prints one line and exits 0. `--cpu-dry-run` (a developer flag, used by
tests/test_gpu_check.py) runs the same pipeline on CPU in fp32 at tiny sizes, so that the code path is tested where
there is no GPU: training on recipes/tiny_cpu.yaml at one rank; memory: the activation estimate against autograd's
saved tensors (memory_accuracy's CPU measurement, in this process); speed: moe_speed's GEMM rate only (its model
comparison's rows are tested on the bench's committed CPU result).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks/results/gpu_check.json"
DRY_RUN_RESULTS = ROOT / "benchmarks/results/gpu_check_cpu_dry_run.json"  # never mistaken for a GPU's figures
WORK = ROOT / "runs/gpu-check"  # the parts' logs and run folders, emptied at each start
BACKENDS = ("legacy", "autoep")
TOTAL_LIMIT_S = 450  # on a GPU every part's limit is cut to what is left of this: the whole stays under 8 minutes
# the first step's loss, autoep against legacy (same weights and batch; only the expert kernels differ): fp32 agrees
# to ~1e-7 (measured on CPU); bf16 rounds every product, so only a gross difference (a broken backend) is flagged
LOSS_AGREEMENT = {"fp32": 1e-4, "bf16": 0.1}
NO_GPU = "gpu-check: no GPU here (torch.cuda.is_available() is False); nothing to check"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What each part runs: the GPU sizes, or the CPU dry run's tiny ones."""

    device: str
    precision: str
    recipe: Path
    train_sets: tuple[str, ...]  # `--set` overrides of every training run
    speed_args: tuple[str, ...]  # moe_speed.py's arguments (besides --json)
    limits_s: dict[str, int]  # part -> time limit
    peak_tflops: float  # the card's dense peak: every MFU is against it
    total_s: int  # every part's limit is cut to what is left of this
    work: Path = WORK  # logs, run folders and the bench's JSON


def gpu_plan(peak_tflops: float) -> Plan:
    return Plan("cuda", "bf16", ROOT / "recipes/gpu_check.yaml", (f"hardware.peak_tflops={peak_tflops:g}",),
                ("--device", "cuda", "--dtype", "bf16", "--peak-tflops", f"{peak_tflops:g}"),
                {"train": 90, "memory": 120, "speed": 150}, peak_tflops, TOTAL_LIMIT_S)


def cpu_dry_run_plan(peak_tflops: float) -> Plan:
    train = ("parallel.pp=1", "parallel.ep=1", "parallel.dp=1", "train.steps=6", "train.warmup_steps=1",
             "train.log_every=1", "tracking.wandb.mode=disabled", f"hardware.peak_tflops={peak_tflops:g}")
    # the bench's GEMM rate only (an empty --parts): its model comparison builds the seed layer shape (64 experts of
    # 1024 x 2048), ~50 s on these CPUs even at 64 tokens; the rows of that comparison are tested on the bench's
    # committed CPU result (tests/test_gpu_check.py)
    speed = ("--device", "cpu", "--dtype", "fp32", "--parts", "", "--peak-tflops", f"{peak_tflops:g}")
    # ~20 s a training run and ~10 s for the GEMM on an idle 2-core machine; the limits allow for a busy one
    return Plan("cpu", "fp32", ROOT / "recipes/tiny_cpu.yaml", train, speed, {"train": 300, "memory": 60, "speed": 120},
                peak_tflops, 900)


# ---------------------------------------------------------------------------------------------------------------
# running a part


@dataclasses.dataclass
class Outcome:
    ok: bool
    status: str  # "ok", "exit N", "timed out after N s", "not started: ..."
    seconds: float
    log: Path


class Clock:
    """The whole run's time budget: a part gets its own limit or what is left, whichever is smaller."""

    def __init__(self, total_s: float):
        self.end = time.monotonic() + total_s

    def limit(self, own_s: float) -> float:
        return max(0.0, min(own_s, self.end - time.monotonic()))


def run_part(command: list[str], log: Path, limit_s: float, env: dict[str, str] | None = None) -> Outcome:
    """Run `command` in a session of its own (the deepspeed launcher and its ranks, moe_speed's children) with stdout
    and stderr in `log`; past `limit_s` the whole session is stopped (SIGTERM, then SIGKILL 10 s later)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if limit_s <= 0:
        return Outcome(False, "not started: the time budget is spent", 0.0, log)
    start = time.monotonic()
    with log.open("w") as out:
        out.write("+ " + " ".join(command) + "\n")
        out.flush()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            _stop_session(proc)
            return Outcome(False, f"timed out after {limit_s:.0f} s", time.monotonic() - start, log)
    seconds = time.monotonic() - start
    return Outcome(code == 0, "ok" if code == 0 else f"exit {code}", seconds, log)


def _stop_session(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # the session this script started for the part, and nothing else
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def shown(path: Path) -> str:
    """`path` relative to the checkout where it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def last_line(log: Path) -> str:
    """The log's last non-empty line (what a failed part's row shows), cut to 300 characters."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    return lines[-1][:300] if lines else ""


# ---------------------------------------------------------------------------------------------------------------
# rows


def row(part: str, backend: str, figure: str, value: str = "", status: str = "ok", **extra: Any) -> dict[str, Any]:
    """One table row; `extra` (estimate, measured, error, raw numbers) goes to the JSON and, where named so, to the
    table's estimate / measured / error columns."""
    return {"part": part, "backend": backend, "figure": figure, "value": value, "status": status, **extra}


def failure_row(part: str, backend: str, outcome: Outcome) -> dict[str, Any]:
    return row(part, backend, "run", f"see {shown(outcome.log)}: {last_line(outcome.log)}",
               f"FAILED ({outcome.status})", seconds=round(outcome.seconds, 1))


def check(ok: bool) -> str:
    return "ok" if ok else "FAILED"


# ---------------------------------------------------------------------------------------------------------------
# part 1: a short training per backend


def train_part(plan: Plan, clock: Clock) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from moe_model.metrics_file import read_metrics

    rows, runs = [], {}
    for backend in BACKENDS:
        out_dir = plan.work / f"train-{backend}"
        command = [sys.executable, "-m", "moe_model.cli", "train", str(plan.recipe),
                   "--set", f"parallel.moe_backend={backend}", "--set", f"train.output_dir={out_dir}",
                   *[word for override in plan.train_sets for word in ("--set", override)]]
        outcome = run_part(command, plan.work / f"train-{backend}.log", clock.limit(plan.limits_s["train"]))
        if not outcome.ok:
            rows.append(failure_row("train", backend, outcome))
            continue
        run = json.loads((out_dir / "run.json").read_text())
        metrics = read_metrics(out_dir / "metrics.jsonl")
        runs[backend] = metrics
        rows += train_rows(backend, plan.precision, run, metrics, outcome.seconds)
    if len(runs) == len(BACKENDS):
        rows.append(agreement_row(runs, plan.precision))
    return rows, {b: {"metrics": m} for b, m in runs.items()}


def train_rows(backend: str, precision: str, run: dict[str, Any], metrics: list[dict[str, Any]],
               seconds: float) -> list[dict[str, Any]]:
    """The checks and figures of one finished training run (its run.json and metrics records)."""
    layout, ds = run["layout"], run["deepspeed"]
    uses_autoep = bool(ds.get("expert_parallel", {}).get("enabled"))
    built = layout["moe_backend"] == backend and uses_autoep == (backend == "autoep")
    losses = [m["loss"] for m in metrics]
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    steady = metrics[len(metrics) // 2:]  # the last half: after warm-up, allocator growth and first-step setup
    median = {key: statistics.median(m[key] for m in steady) for key in ("tokens_per_s", "mfu", "step_time_s")}
    peak_tflops = run["recipe"]["hardware"]["peak_tflops"]
    return [
        row("train", backend, "backend built", f"moe_backend {layout['moe_backend']}, expert_parallel "
            f"{'on' if uses_autoep else 'off'}", check(built)),
        row("train", backend, f"loss, step 1 -> {metrics[-1]['step'] if metrics else '?'} ({precision})",
            f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no metrics", check(finite and losses[-1] < losses[0]),
            first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None),
        row("train", backend, "tokens/s (median, last half)", f"{median['tokens_per_s']:,.0f}",
            tokens_per_s=median["tokens_per_s"], step_time_s=median["step_time_s"]),
        row("train", backend, f"MFU vs {peak_tflops:g} TFLOPS (trainer's)", f"{median['mfu']:.1%}", mfu=median["mfu"]),
        row("train", backend, f"peak memory ({run['memory_metric']})", f"{metrics[-1]['memory_peak_gb']:.2f} GB",
            memory_peak_gb=metrics[-1]["memory_peak_gb"], wall_s=round(seconds, 1)),
    ]


def agreement_row(runs: dict[str, list[dict[str, Any]]], precision: str) -> dict[str, Any]:
    """autoep's first-step loss against legacy's (the reference: the model's own block)."""
    first = {backend: metrics[0]["loss"] for backend, metrics in runs.items()}
    diff = abs(first["autoep"] - first["legacy"])
    tolerance = LOSS_AGREEMENT[precision]
    return row("train", "autoep vs legacy", f"|loss difference|, step 1 (tolerance {tolerance:g})", f"{diff:.2e}",
               check(diff <= tolerance), loss_difference=diff, tolerance=tolerance)


# ---------------------------------------------------------------------------------------------------------------
# part 2: the memory estimator against measurement


def memory_part(plan: Plan, clock: Clock) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import memory_accuracy

    if plan.device == "cpu":  # the dry run: memory_accuracy's CPU measurement (autograd's saved tensors), fp32
        measured = [memory_accuracy.measure_activation_case(case) for case in memory_accuracy.ACTIVATION_CASES[:3]]
    else:
        from moe_model.launch import deepspeed_command, rank_env

        out = plan.work / "memory.json"
        command = deepspeed_command(1, ROOT / "benchmarks/memory_accuracy.py", ["--measure-gpu", str(out)])
        outcome = run_part(command, plan.work / "memory.log", clock.limit(plan.limits_s["memory"]),
                           rank_env(WANDB_MODE="disabled", WANDB_SILENT="true"))
        if not outcome.ok:
            return [failure_row("memory", "legacy", outcome)], []
        measured = json.loads(out.read_text())
    return [row("memory", "legacy", f"{m['kind']}: {m['config']}", "", "ok", estimate=m["estimate"],
                measured=m["measured"], error=m["error"]) for m in measured], measured


# ---------------------------------------------------------------------------------------------------------------
# part 3: the speed bench


def speed_part(plan: Plan, clock: Clock) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    out = plan.work / "moe_speed.json"
    outcome = run_part([sys.executable, str(ROOT / "benchmarks/moe_speed.py"), *plan.speed_args, "--json", str(out)],
                       plan.work / "speed.log", clock.limit(plan.limits_s["speed"]))
    if not outcome.ok:
        return [failure_row("speed", "legacy", outcome)], {}
    bench = json.loads(out.read_text())
    return speed_rows(bench, plan.peak_tflops), bench


def speed_rows(bench: dict[str, Any], peak_tflops: float) -> list[dict[str, Any]]:
    """The rows of a moe_speed result (its JSON), for the parts the bench ran: its GEMM rate, its own rows of the
    model against Mixtral (`moe_speed.mixtral_rows`, with tokens/s and MFU against `peak_tflops`) and DeepSpeed's
    1-rank engine over the bare model."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import moe_speed

    dtype = bench["dtype"]
    rows = [row("speed", "", f"GEMM rate ({dtype})", f"{bench['gemm_flops_s'] / 1e12:.2f} TFLOP/s",
                gemm_flops_s=bench["gemm_flops_s"])]
    if "model_vs_mixtral" in bench:
        # device "cuda" asks the bench for its tokens/s and MFU rows (it adds them to a GPU run's table only)
        asked = argparse.Namespace(device="cuda", tokens=bench["tokens"], peak_tflops=peak_tflops)
        rows += [row("speed", "legacy", f"{name} ({dtype})", value)
                 for name, value in moe_speed.mixtral_rows(asked, bench["model_vs_mixtral"], bench["gemm_flops_s"])]
    for run in bench.get("deepspeed_vs_bare", []):
        times = run["times_s"]
        rows.append(row("speed", "legacy", f"DeepSpeed 1-rank engine / bare model + AdamW, ZeRO-{run['zero_stage']}",
                        f"{times['deepspeed'] / times['bare']:.3f}", times_s=times))
    return rows


# ---------------------------------------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption="memory: bytes, error = (estimate - measured) / measured")
    for column in ("part", "backend", "figure", "value", "estimate", "measured", "error", "status"):
        table.add_column(column, justify="right" if column in ("value", "estimate", "measured", "error") else "left")
    for r in rows:
        table.add_row(r["part"], r["backend"], r["figure"], r["value"],
                      f"{r['estimate']:,}" if "estimate" in r else "", f"{r['measured']:,}" if "measured" in r else "",
                      f"{r['error']:+.1%}" if "error" in r else "",
                      r["status"] if r["status"] == "ok" else f"[red]{r['status']}[/]")
    Console(width=200).print(table)


def positive(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of TFLOPS (the card's dense bf16 peak), got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    from moe_model.cli.arguments import OneLineParser

    parser = OneLineParser(prog="gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--peak-tflops", type=positive, default=989.0,
                        help="the card's dense bf16 peak, for MFU (default 989: H100/H200 SXM)")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON file (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=WORK, help=argparse.SUPPRESS)  # tests: a folder of their own
    args = parser.parse_args(argv)
    args.out = args.out or (DRY_RUN_RESULTS if args.cpu_dry_run else RESULTS)

    import torch

    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print(NO_GPU)
        return 0
    plan = cpu_dry_run_plan(args.peak_tflops) if args.cpu_dry_run else gpu_plan(args.peak_tflops)
    device = "CPU dry run (fp32, tiny sizes: tests the code path, not the machine)" if args.cpu_dry_run \
        else f"{torch.cuda.get_device_name(0)}, bf16"
    if args.work.resolve() == WORK:
        shutil.rmtree(WORK, ignore_errors=True)  # this script's own folder: the previous check's logs
    elif args.work.exists() and any(args.work.iterdir()):
        print(f"gpu-check: --work {args.work} is not empty; give a new or empty folder", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    plan = dataclasses.replace(plan, work=args.work)
    started, clock = time.monotonic(), Clock(plan.total_s)
    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    details: dict[str, Any] = {}
    for name, part in PARTS.items():
        t = time.monotonic()
        try:
            part_rows, details[name] = part(plan, clock)
        except Exception as err:  # a result that cannot be read is that part's failure: the others still run
            (plan.work / f"{name}.error.log").write_text(traceback.format_exc())
            part_rows = [row(name, "", "result", f"{type(err).__name__}: {err}"[:160], "FAILED (see "
                             f"{shown(plan.work / f'{name}.error.log')})")]
        rows += part_rows
        seconds[name] = time.monotonic() - t

    wall = time.monotonic() - started
    failed = [r for r in rows if r["status"] != "ok"]
    print_table(rows, f"gpu-check: {device}; {wall:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
                + ")")
    result = {"device": device, "dry_run": args.cpu_dry_run, "precision": plan.precision,
              "peak_tflops": args.peak_tflops, "torch": torch.__version__, "cuda": torch.version.cuda,
              "wall_s": round(wall, 1), "part_s": {k: round(v, 1) for k, v in seconds.items()},
              "failed": len(failed), "rows": rows, **details}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {shown(args.out)}; logs in {shown(plan.work)}/" + (f"; {len(failed)} FAILED" if failed else ""))
    return 1 if failed else 0


PARTS = {"train": train_part, "memory": memory_part, "speed": speed_part}  # each: (plan, clock) -> (rows, details)

if __name__ == "__main__":
    sys.exit(main())
