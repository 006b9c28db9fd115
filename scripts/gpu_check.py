"""`make gpu-check`: the one script a session lent a GPU runs first (under 8 minutes on one GPU), built to fail.

    .venv/bin/python scripts/gpu_check.py                      # on a GPU machine; --peak-tflops 989 (H100/H200)
    .venv/bin/python scripts/gpu_check.py --peak-tflops 312    # the card's dense bf16 peak (A100: 312)

Before anything: where torch sees no CUDA device but the machine has GPUs (nvidia-smi answers, /dev/nvidia0, or
/proc/driver/nvidia/gpus/*), it prints torch's version, torch.version.cuda, the driver version and the fix, and
exits 1 (a CPU-only torch build on a GPU machine is a failure, not "no GPU"). Only a machine with no GPU at all
prints one line and exits 0.

Stage 1 (one GPU), `recipes/gpu_check.yaml`, every training launch the project's trainer (scripts/gpu_check_rank.py
wraps `moe_model.train.main`) on each MoE backend (legacy: the model's own block; autoep: DeepSpeed's AutoEP):
- a reference run with `save_every`, and the same run SIGKILLed as step `kill_at` begins, then resumed
  (`resume: auto`): the resumed metrics.jsonl must hold the reference's steps with its losses and grad norms
  (`RESUME_TOLERANCE`), resumed from the checkpoint the kill left;
- `moe export --format mixtral` of the reference's last checkpoint loaded by transformers' MixtralForCausalLM on the
  same device: its logits against the engine's own on the same batch (`EXPORT_TOLERANCE`);
- the number of `AutoEPMoELayer` modules in the live engine (the rank counts them in its module tree): every layer
  on autoep, none on legacy;
- the loss finite and falling; the trainer's MFU above `MFU_FLOOR` (GPU only);
- the two backends' whole loss and grad-norm curves against each other (`AGREEMENT`, bf16), and an fp32 pair of
  short runs held to 1e-4.
Memory: each case of benchmarks/memory_accuracy.py's GPU program in a process of its own (`--case N`), the
estimate against `torch.cuda.max_memory_allocated` (`MEMORY_BOUND`) and `max_memory_reserved` against the
estimate's allocator share. Speed: the recipe's model against transformers' Mixtral, same weights, same batch, both
cast whole to bf16 (scripts/gpu_check_parts.py speed): both losses (`MIXTRAL_LOSS`), our step time at most
`MIXTRAL_SLOWDOWN` x Mixtral's.
GEMMs: moe_model.calibrate.gemm_probe on the device (bf16 on a GPU): the recipe's GEMMs and Mixtral-8x7B's and
Qwen3-30B-A3B's expert GEMMs at 4096 tokens, grouped and looped, timed; the shape figures fitted to them must explain
the table better than one efficiency (rms log error), and are written as a `hardware:` section
(benchmarks/results/gpu_gemm.yaml) to pass to `moe plan`/`moe estimate` as overrides.
Stage 2, only where 2 or more GPUs exist: the same training rows on every local GPU with ep = N on both backends
and a pipeline (pp 2, legacy).

A red row gives exit 1. One table; JSON in benchmarks/results/gpu_check.json (or --out); every launch's log in
runs/gpu-check/. `--cpu-dry-run` (a developer flag, tests/test_gpu_check.py) runs the same pipeline on CPU ranks in
fp32 at tiny sizes (recipes/tiny_cpu.yaml): the bf16 rows are skipped there (bf16 matrix products are ~400x slower on
these CPUs) and the timing rows (MFU floor, Mixtral slowdown) are shown but not gated (a CPU is not the GPU the
floors are for); `--dry-run-ranks 2` adds stage 2 on 2 CPU ranks. Only in the dry run, GPU_CHECK_FAULTS (comma-
separated: resume, backend, export, memory) injects the faults the rows must catch.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
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
WORK = ROOT / "runs/gpu-check"  # the launches' logs and run folders, emptied at each start
RANK_PROGRAM = ROOT / "scripts/gpu_check_rank.py"
PARTS_PROGRAM = ROOT / "scripts/gpu_check_parts.py"
BACKENDS = ("legacy", "autoep")
TOTAL_LIMIT_S = 460  # on a GPU every launch's limit is cut to what is left of this: the whole stays under 8 minutes
FAULTS = ("resume", "backend", "export", "memory")

# Thresholds, each with why (relative differences: |a - b| / max(|b|, 1e-12), per logged step):
# resume: the resumed steps replay the reference's on the same weights, Adam moments, data position and RNG. fp32 on
# CPU ranks is deterministic (measured: identical); 1e-6 leaves room for a GPU's reordered fp32 reductions. bf16 on a
# GPU may differ by atomics' order in the backward (scatter/index_add): 2e-3, far under what a lost moment, a
# restarted schedule or another data position moves a loss (~1e-2 and more at these learning rates).
RESUME_TOLERANCE = {"fp32": 1e-6, "bf16": 2e-3}
# backend agreement, the whole curve (loss and grad_norm): AutoEP and the model's own block compute the same function
# on the same weights; fp32 agrees to ~1e-7 (measured on CPU), held to 1e-4 (the issue's figure). In bf16 every
# product rounds (8 bits of mantissa, ~4e-3) and the curves drift apart as training compounds it: loss 2e-2, grad
# norm 1e-1 over the short run (not measured on a GPU in this session); a wrong expert or routing weight moves the
# first step's grad norm by more than that.
AGREEMENT = {"fp32": {"loss": 1e-4, "grad_norm": 1e-4}, "bf16": {"loss": 2e-2, "grad_norm": 1e-1}}
# export: max |logit difference| / max |logit| between the engine and the exported folder in transformers: the same
# weights, other kernels; fp32 sums in another order (~1e-6), bf16 rounds each layer's output (~1e-2 over 4 layers).
# A swapped or missing expert moves logits by O(10%) (the dry run's export fault: measured in its test).
EXPORT_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}
# memory: CPU ranks measure the bytes autograd saves (exact, memory_accuracy's 26 cases at 0.0%): 1%. On a GPU the
# allocator's peak adds workspaces and rounding the estimator models as a whole: +-25% of max_memory_allocated, and
# max_memory_reserved at most the estimate less the reserve outside the allocator (its fragmentation allowance in).
MEMORY_BOUND = {"cpu": 0.01, "cuda": 0.25}
# MFU floor of the trainer's MFU on recipes/gpu_check.yaml (median of the reference run's last half): a CPU fallback
# is < 0.1% of a 989 TFLOPS card and a kernel that loops over experts or tokens a few %; a working grouped GEMM on
# 16k-token steps of this shape is expected well above 5% (an estimate: no GPU was lent to the session that set it;
# the first GPU run's figure is in benchmarks/results/gpu_check.json). --mfu-floor overrides it.
MFU_FLOOR = 0.05
# the model against transformers' Mixtral (same weights and batch, both whole in one dtype): losses within 1e-5
# relative in fp32 (README: init_from's first loss equals Mixtral's within 1e-5), 1e-2 in bf16 (rounding); our step
# at most 1.25x Mixtral's time (ours runs grouped GEMMs; a fallback to a per-expert loop is several times slower).
MIXTRAL_LOSS = {"fp32": 1e-5, "bf16": 1e-2}
MIXTRAL_SLOWDOWN = 1.25
NO_GPU = ("gpu-check: no GPU here (torch.cuda.is_available() is False; no nvidia-smi, /dev/nvidia0 or "
          "/proc/driver/nvidia/gpus); nothing to check")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What each part runs: the GPU sizes, or the CPU dry run's tiny ones."""

    device: str
    precision: str
    recipe: Path
    train_sets: tuple[str, ...]  # `--set` overrides of every training launch
    steps: int  # the reference run's steps; save_every divides it
    save_every: int
    kill_at: int  # the killed launch dies as this step (1-based) begins
    memory_cases: tuple[int, ...]  # GPU: memory_accuracy.GPU_CASES indices; CPU: ACTIVATION_CASES indices
    peak_tflops: float  # the card's dense peak: every MFU is against it
    total_s: int  # every launch's limit is cut to what is left of this
    launch_s: int  # one launch's own limit
    gated_timing: bool  # MFU floor and Mixtral slowdown gate (GPU) or are only shown (CPU dry run)
    fp32_pair: bool  # a bf16 plan adds a short fp32 run per backend, agreement held to 1e-4
    ranks: int  # the GPUs (or CPU ranks) of stage 2; < 2: no stage 2
    concurrent: bool  # the two backends' launches side by side (CPU: each launch is mostly one core's start-up)
    mfu_floor: float = MFU_FLOOR
    work: Path = WORK


def gpu_plan(peak_tflops: float, gpus: int, mfu_floor: float) -> Plan:
    return Plan("cuda", "bf16", ROOT / "recipes/gpu_check.yaml", (f"hardware.peak_tflops={peak_tflops:g}",),
                steps=12, save_every=4, kill_at=11, memory_cases=(0, 1, 2, 3), peak_tflops=peak_tflops,
                total_s=TOTAL_LIMIT_S, launch_s=150, gated_timing=True, fp32_pair=True, ranks=gpus, concurrent=False,
                mfu_floor=mfu_floor)


def cpu_dry_run_plan(peak_tflops: float, ranks: int = 1) -> Plan:
    sets = ("train.warmup_steps=1", "train.log_every=1", "tracking.wandb.mode=disabled",
            f"hardware.peak_tflops={peak_tflops:g}", "train.global_batch_size=4", "train.seq_len=32",
            "parallel.micro_batch_size=2")
    # 4 steps, checkpoints at 2 and 4, killed as step 4 begins: the resume starts from step 2 and trims step 3's line
    return Plan("cpu", "fp32", ROOT / "recipes/tiny_cpu.yaml", sets, steps=4, save_every=2, kill_at=4,
                memory_cases=(1, 9), peak_tflops=peak_tflops, total_s=900, launch_s=300, gated_timing=False,
                fp32_pair=False, ranks=ranks, concurrent=True)


def dry_run_faults() -> set[str]:
    return {f for f in os.environ.get("GPU_CHECK_FAULTS", "").split(",") if f}


# ---------------------------------------------------------------------------------------------------------------
# is there a GPU torch cannot use?


def gpu_evidence(root: Path = Path("/")) -> list[str]:
    """What says this machine has NVIDIA GPUs, whatever torch sees: nvidia-smi answering with a GPU, /dev/nvidia0,
    /proc/driver/nvidia/gpus/* (under `root`, for tests)."""
    found = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and "GPU" in out.stdout:
                found.append(f"nvidia-smi -L: {out.stdout.strip().splitlines()[0]}")
        except (OSError, subprocess.TimeoutExpired):
            pass
    if (root / "dev/nvidia0").exists():
        found.append(str(root / "dev/nvidia0"))
    gpus = sorted(glob.glob(str(root / "proc/driver/nvidia/gpus/*")))
    if gpus:
        found.append(f"{len(gpus)} in {root / 'proc/driver/nvidia/gpus'}")
    return found


def driver_version(root: Path = Path("/")) -> str:
    """The NVIDIA driver's version and GPU name (nvidia-smi), else /proc/driver/nvidia/version's first line."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version,name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    version = root / "proc/driver/nvidia/version"
    if version.exists():
        lines = version.read_text(errors="replace").strip().splitlines()
        return lines[0] if lines else "unknown"
    return "unknown (no nvidia-smi, no /proc/driver/nvidia/version)"


def unusable_gpu_lines(evidence: list[str], root: Path = Path("/")) -> list[str]:
    import torch

    return [f"gpu-check: FAILED: this machine has GPUs ({'; '.join(evidence)}) but torch cannot use them",
            f"gpu-check: torch {torch.__version__}, torch.version.cuda {torch.version.cuda}, driver "
            f"{driver_version(root)}",
            "gpu-check: fix: reinstall torch with CUDA into the venv (README, \"GPU machines\": .venv/bin/pip install "
            "--force-reinstall torch==<the pin> --index-url <PyTorch's CUDA index for this driver>), then run "
            "make gpu-check again"]


# ---------------------------------------------------------------------------------------------------------------
# running a launch

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


def failure_row(part: str, backend: str, outcome: Outcome, figure: str = "run") -> dict[str, Any]:
    return row(part, backend, figure, f"see {shown(outcome.log)}: {last_line(outcome.log)}",
               f"FAILED ({outcome.status})", seconds=round(outcome.seconds, 1))


def check(ok: bool) -> str:
    return "ok" if ok else "FAILED"


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def largest_difference(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> float:
    """The largest relative difference of `key` over the steps of two metrics lists (inf where one lacks it or the
    steps differ)."""
    if [m["step"] for m in a] != [m["step"] for m in b] or not a:
        return math.inf
    values = [(x.get(key), y.get(key)) for x, y in zip(a, b)]
    if any(x is None or y is None for x, y in values):
        return math.inf
    return max(relative(x, y) for x, y in values)


# ---------------------------------------------------------------------------------------------------------------
# part 1: training per backend, with kill-and-resume and export


@dataclasses.dataclass(frozen=True)
class Series:
    """A training row's launches: a reference run and, with `resume`, the same run killed and resumed."""

    stage: int
    label: str  # the table's backend column
    backend: str
    ranks: int
    layout: tuple[str, ...]  # parallel.* overrides
    precision: str
    resume: bool = True
    export: bool = True  # pp 1 only: a pipeline engine's module returns no logits to compare with

    @property
    def name(self) -> str:
        return f"stage{self.stage}-" + self.label.replace(" ", "-")


def stage_series(plan: Plan, stage: int) -> list[Series]:
    if stage == 1:
        one = ("parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.dp=1")
        series = [Series(1, b, b, 1, one, plan.precision) for b in BACKENDS]
        if plan.fp32_pair:
            series += [Series(1, f"fp32 {b}", b, 1, one, "fp32", resume=False, export=False) for b in BACKENDS]
        return series
    n = plan.ranks
    ep = ("parallel.tp=1", "parallel.pp=1", f"parallel.ep={n}", f"parallel.dp={n}")
    pipe = ("parallel.tp=1", "parallel.pp=2", f"parallel.ep={max(1, n // 2)}", f"parallel.dp={n // 2}")
    return [*(Series(2, f"ep{n} {b}", b, n, ep, plan.precision) for b in BACKENDS),
            Series(2, f"pp2 ep{max(1, n // 2)} legacy", "legacy", n, pipe, plan.precision, export=False)]


def launch(plan: Plan, clock: Clock, series: Series, which: str, out_dir: Path, steps: int, save_every: int,
           kill_at: int = 0) -> Outcome:
    """One training launch of `series` through the deepspeed launcher (scripts/gpu_check_rank.py): its log is
    WORK/<series>/<which>.log, its probe WORK/<series>/<which>.probe.json."""
    from moe_model.launch import deepspeed_command, rank_env

    base = plan.work / series.name
    sets = (*plan.train_sets, *series.layout, f"parallel.moe_backend={series.backend}",
            f"train.precision={series.precision}", f"train.steps={steps}", f"train.save_every={save_every}",
            f"train.output_dir={out_dir}")
    command = deepspeed_command(series.ranks, RANK_PROGRAM, ["--recipe", str(plan.recipe)], overrides=sets)
    env = rank_env(WANDB_MODE="disabled", WANDB_SILENT="true", GPU_CHECK_PROBE=str(base / f"{which}.probe.json"),
                   GPU_CHECK_KILL_AT=str(kill_at))
    env.pop("GPU_CHECK_FAULTS", None)
    if plan.device == "cpu" and dry_run_faults():
        env["GPU_CHECK_FAULTS"] = ",".join(sorted(dry_run_faults()))
    return run_part(command, base / f"{which}.log", clock.limit(plan.launch_s), env)


def run_series(plan: Plan, clock: Clock, series: Series) -> dict[str, Any]:
    """The launches of `series`, in order: reference; then killed and resumed in one output folder."""
    base = plan.work / series.name
    base.mkdir(parents=True, exist_ok=True)
    steps, save_every = (plan.steps, plan.save_every) if series.resume else (max(2, plan.steps // 2), 0)
    def reference() -> Outcome:
        return launch(plan, clock, series, "reference", base / "reference", steps, save_every)

    def killed() -> Outcome:
        return launch(plan, clock, series, "killed", base / "resumed", steps, save_every, plan.kill_at)

    if not series.resume:
        return {"reference": reference()}
    if plan.concurrent:  # CPU: the two launches are independent (own folders); a GPU runs them in turn (MFU)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            done = dict(zip(("reference", "killed"), pool.map(lambda f: f(), (reference, killed))))
    else:
        done = {"reference": reference(), "killed": killed()}
    if done["reference"].ok and not done["killed"].status.startswith(("timed out", "not started")):
        done["resumed"] = launch(plan, clock, series, "resumed", base / "resumed", steps, save_every)
    return done


def read_probe(plan: Plan, series: Series, which: str) -> dict[str, Any]:
    path = plan.work / series.name / f"{which}.probe.json"
    return json.loads(path.read_text()) if path.exists() else {}


def series_rows(plan: Plan, series: Series, done: dict[str, Outcome]) -> tuple[list[dict[str, Any]], list | None]:
    """The rows of one series' launches, and the reference's metrics (None where it failed)."""
    from moe_model.metrics_file import read_metrics
    from moe_model.recipe import load_recipe

    part, label, base = f"train{series.stage}", series.label, plan.work / series.name
    reference = done["reference"]
    if not reference.ok:
        return [failure_row(part, label, reference, "reference run")], None
    recipe = load_recipe(plan.recipe, [*plan.train_sets, *series.layout])
    layers = recipe.model.num_hidden_layers
    metrics = read_metrics(base / "reference/metrics.jsonl")
    run = json.loads((base / "reference/run.json").read_text())
    probe = read_probe(plan, series, "reference")
    pp = run["layout"]["pp"]
    expected = layers // pp if series.backend == "autoep" else 0  # rank 0's stage: layers / pp where pp > 1
    count = probe.get("autoep_layers")
    rows = [row(part, label, "AutoEP layers in the live engine (rank 0's module tree)",
                f"{count} (expected {expected} of {layers} layers)", check(count == expected), autoep_layers=count)]
    losses = [m["loss"] for m in metrics]
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    rows.append(row(part, label, f"loss, step 1 -> {metrics[-1]['step'] if metrics else '?'} ({series.precision})",
                    f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no metrics",
                    check(finite and losses[-1] < losses[0]), losses=losses))
    steady = metrics[len(metrics) // 2:]  # the last half: after warm-up, allocator growth and first-step setup
    if steady:
        mfu = statistics.median(m["mfu"] for m in steady)
        tokens = statistics.median(m["tokens_per_s"] for m in steady)
        gated = plan.gated_timing and series.precision == "bf16" and series.stage == 1
        rows.append(row(part, label, f"MFU vs {plan.peak_tflops:g} TFLOPS (trainer's, median of the last half)"
                        + (f", floor {plan.mfu_floor:.0%}" if gated else ", not gated (CPU dry run / not stage 1 bf16)"),
                        f"{mfu:.2%}; {tokens:,.0f} tokens/s", check(mfu > plan.mfu_floor) if gated else "ok",
                        mfu=mfu, tokens_per_s=tokens))
        last = metrics[-1]
        reserved = last.get("memory_reserved_peak_gb")  # logged on CUDA ranks by newer trainers only
        rows.append(row(part, label, f"peak memory ({run.get('memory_metric', 'memory_peak_gb')})",
                        f"{last['memory_peak_gb']:.2f} GB" + (f", reserved {reserved:.2f} GB" if reserved else ""),
                        memory_peak_gb=last["memory_peak_gb"], memory_reserved_peak_gb=reserved))
    if series.resume:
        rows += resume_rows(plan, series, done, metrics)
    if series.export:
        rows.append(guarded(part, label, "export", lambda: export_row(plan, series, recipe.model.vocab_size)))
    return rows, metrics


def resume_rows(plan: Plan, series: Series, done: dict[str, Outcome], reference: list[dict[str, Any]]):
    from moe_model.metrics_file import read_metrics

    part, label, base = f"train{series.stage}", series.label, plan.work / series.name
    killed = done.get("killed")
    resumed = done.get("resumed")
    ok_kill = killed is not None and not killed.ok and killed.status.startswith("exit")
    rows = [row(part, label, f"killed (SIGKILL) as step {plan.kill_at} began", killed.status if killed else
                "not run", check(ok_kill))]
    if resumed is None or not resumed.ok:
        rows.append(failure_row(part, label, resumed, "resumed run") if resumed else
                    row(part, label, "resumed run", "not run", "FAILED"))
        return rows
    start = read_probe(plan, series, "resumed").get("first_step")
    expected = (plan.kill_at - 1) // plan.save_every * plan.save_every
    after = read_metrics(base / "resumed/metrics.jsonl")
    tolerance = RESUME_TOLERANCE[series.precision]
    diff = max(largest_difference(after, reference, "loss"), largest_difference(after, reference, "grad_norm"))
    rows.append(row(part, label, f"resumed from step {start} (expected {expected}): steps, losses and grad norms "
                    f"against the uninterrupted run (tolerance {tolerance:g} relative)", f"{diff:.2e}",
                    check(start == expected and diff <= tolerance), resume_difference=diff, tolerance=tolerance))
    return rows


def export_row(plan: Plan, series: Series, vocab_size: int) -> dict[str, Any]:
    """`moe export --format mixtral` of the reference's newest checkpoint (its last step), loaded by transformers'
    MixtralForCausalLM on the device and in the precision the engine ran; its logits on the probe batch against the
    engine's (written by the rank after its last step)."""
    import torch
    from transformers import MixtralForCausalLM

    from transformers.utils import logging as hf_logging

    from moe_model.train.export import export

    hf_logging.disable_progress_bar()  # the weights' loading and writing bars, in the check's own output
    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_check_rank import probe_ids

    base = plan.work / series.name
    folder = export(base / "reference", base / "export", "mixtral").folder
    dtype = torch.bfloat16 if series.precision == "bf16" else torch.float32
    model = MixtralForCausalLM.from_pretrained(folder, dtype=dtype).to(plan.device).eval()
    if "export" in dry_run_faults() and plan.device == "cpu":  # the dry run's fault: experts 0 and 1 of layer 0 swapped
        with torch.no_grad():
            experts = next(p for n, p in model.named_parameters() if ".experts." in n and p.ndim == 3)
            experts[[0, 1]] = experts[[1, 0]].clone()
    engine = torch.load(base / "reference.probe.json.logits.pt")
    with torch.no_grad():
        ours = model(input_ids=probe_ids(vocab_size, plan.device)).logits.float().cpu()
    error = float((ours - engine).abs().max() / engine.abs().max())
    tolerance = EXPORT_TOLERANCE[series.precision]
    return row(f"train{series.stage}", series.label, f"moe export (mixtral) logits vs the engine's, max |diff| / max "
               f"|logit| (tolerance {tolerance:g})", f"{error:.2e}", check(error <= tolerance), export_error=error)


def guarded(part: str, label: str, figure: str, make) -> dict[str, Any]:
    """`make()`'s row, or a red row naming the exception (a result that cannot be read is that row's failure)."""
    try:
        return make()
    except Exception as err:
        return row(part, label, figure, f"{type(err).__name__}: {err}"[:200], "FAILED")


def agreement_rows(part: str, runs: dict[str, list], precision: str, what: str) -> list[dict[str, Any]]:
    """autoep's whole curve (loss and grad_norm per step) against legacy's (the reference: the model's own block)."""
    if set(runs) != set(BACKENDS) or any(m is None for m in runs.values()):
        return [row(part, "autoep vs legacy", f"agreement ({what})", "a run failed", "FAILED")]
    rows = []
    for key in ("loss", "grad_norm"):
        tolerance = AGREEMENT[precision][key]
        diff = largest_difference(runs["autoep"], runs["legacy"], key)
        rows.append(row(part, "autoep vs legacy", f"{key}, every step ({what}, tolerance {tolerance:g} relative)",
                        f"{diff:.2e}", check(diff <= tolerance), difference=diff, tolerance=tolerance))
    return rows


def train_stage(plan: Plan, clock: Clock, stage: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    series = stage_series(plan, stage)
    if plan.concurrent:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            done = list(pool.map(lambda s: run_series(plan, clock, s), series))
    else:
        done = [run_series(plan, clock, s) for s in series]
    rows, curves = [], {}
    for s, d in zip(series, done):
        series_rows_, metrics = series_rows(plan, s, d)
        rows += series_rows_
        curves[s.label] = metrics
    part = f"train{stage}"
    prefix = {1: "", 2: f"ep{plan.ranks} "}[stage]
    rows += agreement_rows(part, {b: curves.get(prefix + b) for b in BACKENDS}, plan.precision,
                           f"{plan.precision}{', ' + prefix.strip() if prefix else ''}")
    if stage == 1 and plan.precision == "fp32":
        rows.append(row(part, "autoep vs legacy", "bf16 agreement", "skipped: the CPU dry run trains fp32 (bf16 "
                        "matrix products are ~400x slower on these CPUs); the fp32 rows above are held to 1e-4"))
    if stage == 1 and plan.fp32_pair:
        rows += agreement_rows(part, {b: curves.get(f"fp32 {b}") for b in BACKENDS}, "fp32", "fp32 pair")
    return rows, {"curves": curves}


def train1_part(plan: Plan, clock: Clock):
    return train_stage(plan, clock, 1)


def train2_part(plan: Plan, clock: Clock):
    if plan.ranks < 2:
        return [], {"skipped": f"{plan.ranks} GPU(s): stage 2 needs 2 or more"}
    return train_stage(plan, clock, 2)


# ---------------------------------------------------------------------------------------------------------------
# part 2: the memory estimator, one case per process


def memory_case(plan: Plan, clock: Clock, index: int) -> list[dict[str, Any]]:
    out, log = plan.work / f"memory-{index}.json", plan.work / f"memory-{index}.log"
    if plan.device == "cpu":
        env = dict(os.environ)
        command = [sys.executable, str(PARTS_PROGRAM), "memory-cpu", "--case", str(index), "--out", str(out)]
    else:
        from moe_model.launch import deepspeed_command, rank_env

        env = rank_env(WANDB_MODE="disabled", WANDB_SILENT="true")
        env.pop("GPU_CHECK_FAULTS", None)
        command = deepspeed_command(1, ROOT / "benchmarks/memory_accuracy.py",
                                    ["--measure-gpu", str(out), "--case", str(index)])
    outcome = run_part(command, log, clock.limit(plan.launch_s), env)
    if not outcome.ok:
        return [failure_row("memory", "", outcome, f"case {index}")]
    bound = MEMORY_BOUND[plan.device]
    rows = []
    for m in json.loads(out.read_text()) if plan.device == "cuda" else [json.loads(out.read_text())]:
        rows.append(row("memory", "", f"{m['kind']}: {m['config']} (|error| <= {bound:.0%})", "",
                        check(abs(m["error"]) <= bound), estimate=m["estimate"], measured=m["measured"],
                        error=m["error"]))
        if "reserved" in m:
            rows.append(row("memory", "", f"gpu.max_memory_reserved: {m['config']} (<= the estimate less the "
                            "reserve outside the allocator)", "", check(m["reserved"] <= m["reserved_bound"]),
                            estimate=m["reserved_bound"], measured=m["reserved"],
                            error=(m["reserved_bound"] - m["reserved"]) / m["reserved"]))
    return rows


def memory_part(plan: Plan, clock: Clock) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    workers = 2 if plan.concurrent else 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        rows = [r for case_rows in pool.map(lambda i: memory_case(plan, clock, i), plan.memory_cases)
                for r in case_rows]
    return rows, {"cases": list(plan.memory_cases)}


# ---------------------------------------------------------------------------------------------------------------
# part 3: the model's step against transformers' Mixtral


def speed_part(plan: Plan, clock: Clock) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    out = plan.work / "speed.json"
    one = ("parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.dp=1")
    command = [sys.executable, str(PARTS_PROGRAM), "speed", "--recipe", str(plan.recipe), "--device", plan.device,
               "--dtype", plan.precision, "--peak-tflops", f"{plan.peak_tflops:g}", "--out", str(out),
               "--steps", "5" if plan.gated_timing else "2",
               *[w for s in (*plan.train_sets, *one) for w in ("--set", s)]]
    outcome = run_part(command, plan.work / "speed.log", clock.limit(plan.launch_s))
    if not outcome.ok:
        return [failure_row("speed", "", outcome)], {}
    bench = json.loads(out.read_text())
    return speed_rows(bench, plan), bench


def speed_rows(bench: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    dtype, losses, times = bench["dtype"], bench["losses"], bench["times_s"]
    loss_diff = relative(losses["ours"], losses["mixtral"])
    slowdown = times["ours"] / times["mixtral"]
    tolerance = MIXTRAL_LOSS[dtype]
    gated = plan.gated_timing
    return [
        row("speed", "", f"LM loss, ours vs Mixtral, same weights and batch ({dtype}, tolerance {tolerance:g} "
            "relative)", f"{losses['ours']:.4f} vs {losses['mixtral']:.4f}", check(loss_diff <= tolerance),
            loss_difference=loss_diff),
        row("speed", "", f"forward + backward, ours / Mixtral ({dtype}, {bench['tokens']} tokens)"
            + (f", at most {MIXTRAL_SLOWDOWN:g}" if gated else ", not gated (CPU dry run)"),
            f"{times['ours']:.4f} s / {times['mixtral']:.4f} s = {slowdown:.2f}",
            check(slowdown <= MIXTRAL_SLOWDOWN) if gated else "ok", slowdown=slowdown),
        row("speed", "", f"ours: MFU vs {plan.peak_tflops:g} TFLOPS (useful FLOPs / step time); GEMM rate",
            f"{bench['mfu']:.2%}; {bench['gemm_flops_s'] / 1e12:.2f} TFLOP/s", mfu=bench["mfu"],
            gemm_flops_s=bench["gemm_flops_s"]),
    ]


# ---------------------------------------------------------------------------------------------------------------
# part 4: the GEMM table on this device, the shape figures fitted to it (moe_model/calibrate/gemm_probe.py)


def gemm_part(plan: Plan, clock: Clock) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    out = plan.work / "gemm.json"
    command = [sys.executable, "-m", "moe_model.calibrate.gemm_probe", "--recipe", str(plan.recipe), "--device",
               plan.device, "--out", str(out)]
    outcome = run_part(command, plan.work / "gemm.log", clock.limit(plan.launch_s))
    if not outcome.ok:
        return [failure_row("gemm", "", outcome)], {}
    table = json.loads(out.read_text())
    kept = out.with_suffix(".yaml")
    if plan.device == "cuda":  # the card's figures, as a `hardware:` section a recipe can take as its base
        kept = RESULTS.with_name("gpu_gemm.yaml")
        shutil.copyfile(out.with_suffix(".yaml"), kept)
    return gemm_rows(table, kept), table


def gemm_rows(table: dict[str, Any], kept: Path) -> list[dict[str, Any]]:
    tm, tn = table["gemm_tile"]
    by_shape, flat = table["rms_log_error"], table["one_efficiency_rms_log_error"]
    slowest = min(table["rows"], key=lambda r: r["measured_gflops"])
    return [
        row("gemm", "", f"GEMM table: {len(table['rows'])} shapes ({table['dtype']}): the recipe's, Mixtral-like and "
            "fine-grained experts grouped and looped", f"{slowest['gemm']}: {slowest['measured_gflops']:.0f} GFLOP/s "
            f"(slowest); {max(r['measured_gflops'] for r in table['rows']):.0f} (fastest)"),
        row("gemm", "", "fitted: units, tile, K at half rate, rate; one kernel (measured)",
            f"{table['sm_count']}, {tm} x {tn}, {table['gemm_k_half']:g}, {table['gemm_rate_flops'] / 1e12:.3g} "
            f"TFLOP/s; {table['kernel_launch_us']:.2f} us"),
        row("gemm", "", "rms log error of the time by shape < the one-efficiency roofline's (at its best rate)",
            f"{by_shape:.3f} < {flat:.3f}", check(by_shape < flat), by_shape=by_shape, one_efficiency=flat),
        row("gemm", "", "recipe overrides written (hardware: sm_count, gemm_tile, gemm_k_half, kernel_launch_us)",
            shown(kept)),
    ]


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


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction of the peak in [0, 1), got {text}")
    return value


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
    parser.add_argument("--mfu-floor", type=fraction, default=MFU_FLOOR,
                        help=f"the trainer's MFU must exceed this fraction of the peak (default {MFU_FLOOR:g})")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON file (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dry-run-ranks", type=int, choices=(1, 2), default=1, help=argparse.SUPPRESS)
    parser.add_argument("--parts", default=None, help=argparse.SUPPRESS)  # tests: a subset of PARTS, comma-separated
    parser.add_argument("--work", type=Path, default=WORK, help=argparse.SUPPRESS)  # tests: a folder of their own
    args = parser.parse_args(argv)
    args.out = args.out or (DRY_RUN_RESULTS if args.cpu_dry_run else RESULTS)
    unknown = set((args.parts or "").split(",")) - set(PARTS) - {""}
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    faults = dry_run_faults()
    if faults - set(FAULTS) or (faults and not args.cpu_dry_run):
        parser.error(f"GPU_CHECK_FAULTS={','.join(sorted(faults))}: only {', '.join(FAULTS)}, and only with the CPU "
                     "dry run (tests); unset it")

    import torch

    if not torch.cuda.is_available() and not args.cpu_dry_run:
        evidence = gpu_evidence()
        if evidence:
            print("\n".join(unusable_gpu_lines(evidence)))
            return 1
        print(NO_GPU)
        return 0
    if args.cpu_dry_run:
        plan = cpu_dry_run_plan(args.peak_tflops, args.dry_run_ranks)
        device = f"CPU dry run (fp32, tiny sizes, stage 2 on {args.dry_run_ranks} rank(s): tests the code path, not " \
                 "the machine)" + (f"; faults injected: {','.join(sorted(faults))}" if faults else "")
    else:
        plan = gpu_plan(args.peak_tflops, torch.cuda.device_count(), args.mfu_floor)
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, bf16"
    if args.work.resolve() == WORK:
        shutil.rmtree(WORK, ignore_errors=True)  # this script's own folder: the previous check's logs
    elif args.work.exists() and any(args.work.iterdir()):
        print(f"gpu-check: --work {args.work} is not empty; give a new or empty folder", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    plan = dataclasses.replace(plan, work=args.work.resolve())
    started, clock = time.monotonic(), Clock(plan.total_s)
    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    details: dict[str, Any] = {}
    chosen = [p for p in PARTS if not args.parts or p in args.parts.split(",")]
    for name in chosen:
        t = time.monotonic()
        try:
            part_rows, details[name] = PARTS[name](plan, clock)
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
              "faults": sorted(faults), "wall_s": round(wall, 1), "part_s": {k: round(v, 1) for k, v in seconds.items()},
              "failed": len(failed), "rows": rows, **details}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {shown(args.out)}; logs in {shown(plan.work)}/" + (f"; {len(failed)} FAILED" if failed else ""))
    return 1 if failed else 0


# each: (plan, clock) -> (rows, details)
PARTS = {"train1": train1_part, "train2": train2_part, "memory": memory_part, "speed": speed_part, "gemm": gemm_part}

if __name__ == "__main__":
    sys.exit(main())
