"""`moe calibrate RECIPE`: this machine's figures for the performance model, measured with torch and the deepspeed
launcher (`--from RUN_DIR`, the refit from a finished run's step times, is refit.py).

Measured (no GPU needed), each with the thread count a rank of the recipe gets here (the cores shared by its ranks,
as `train.distributed.share_cpu_cores` sets them):
- peak: 2*n^3 FLOPs per [n, n] x [n, n] fp32 product (n = 1024; median of repeated timings after a warm-up), printed
  as `hardware.peak_tflops`;
- memory bandwidth: 2 x bytes per `copy_` of a 128 MB fp32 tensor (read + write; median), `hardware.hbm_bandwidth_tbps`
  with `bandwidth_utilization` = 1;
- efficiency, `hardware.mfu`: one rank's work (`work_probe`: its stage's layers, its heads and experts; with ep > 1
  through the recipe's MoE backend, DeepSpeed's legacy MoE layer or its AutoEP layer, on ep launched ranks, else as
  a one-device model), forward + backward of a micro-batch
  timed (median of 15) less the same at shrunken widths (below) and less the all-to-alls' measured size-dependent
  time; mfu is the compute efficiency at which the model's time for that work (`perf.stage_compute_time`, with the
  measured bandwidth) equals the difference. On small shapes it absorbs what the roofline leaves out (SDPA and
  element-wise kernels far from their peak, DeepSpeed's dispatch and combine);
- links, `hardware.intra_node_gbps` (2 ranks or more): `measure_link_gbps`, the recipe's own messages between ranks;
- the GEMM table (`gemm_probe`): the recipe's own GEMMs and Mixtral-like and fine-grained expert GEMMs, grouped and
  looped, timed, and the shape figures fitted to them (`hardware.sm_count`, `gemm_tile`, `gemm_k_half`) with one
  kernel's measured cost (`hardware.kernel_launch_us`); the efficiency and the fixed cost below are fitted with them;
- the fixed cost of a step, `hardware.step_overhead_ms`: the recipe trained through the deepspeed launcher on its own
  layout (ranks, tp/pp/ep/dp, ZeRO stage, micro-batches, layers, experts, top-k, sequence) with every width shrunk to
  almost nothing (head_dim 2, expert FFN 8*tp; the vocabulary and data kept), 40 steps: the median step time (first
  2 left out) less what the model computes for that shrunken model. What remains is what a step costs whatever its size: op
  dispatch, DeepSpeed's engine and pipeline instructions, collective latencies, the optimizer's per-tensor work.
  `--no-overhead` skips it (0).
The routing skew the timed rank work showed (busiest expert's load over the mean per micro-batch, `routing_imbalance`)
is what the fit and the prediction use for DeepSpeed's capacity-deep expert buffers (legacy, ep > 1, dropless) and
for the rows AutoEP's busiest rank receives (`estimate.traffic`).

"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import LaunchError
from ..estimate.perf import shape_of, stage_compute_time
from ..launch import deepspeed_command, rank_env
from ..recipe import Recipe, RecipeError, recipe_from_dict
from .gemm_probe import measure_gemm_table, shape_overrides
from .predict import predict_step_s
from .refit import measured_step_time
from .timing import measure_bandwidth_tbps, median_seconds
from .work_probe import rank_model_recipe, shrunken_widths, stage_layers_timed, time_work


@contextmanager
def torch_threads(threads: int):
    """torch's intra-op threads set to `threads` for the block, then restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_matmul_tflops(n: int = 1024, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_seconds(lambda: torch.mm(a, b), repeats) / 1e12




MAX_LOCAL_RANKS = 8  # CPU ranks of a small model this kind of machine holds at once


def rank_count(recipe: Recipe) -> int:
    from ..strategy import Strategy

    return Strategy.from_recipe(recipe)[0].gpus


def check_local_ranks(recipe: Recipe) -> int:
    """The recipe's rank count, refused (one line) when it is more CPU ranks than this machine can start."""
    ranks = rank_count(recipe)
    if ranks > MAX_LOCAL_RANKS:
        raise RecipeError("parallel", f"calibrating starts the layout's {ranks} ranks on this machine's CPU, more than "
                                      f"{MAX_LOCAL_RANKS}; calibrate a layout of at most {MAX_LOCAL_RANKS} ranks, or "
                                      "refit from a finished run on the cluster: moe calibrate RECIPE --from RUN_DIR")
    return ranks


def fit_mfu(recipe: Recipe, peak_flops: float, hbm_bytes_s: float, measured_s: float, imbalance: float = 1.0) -> float:
    """The compute efficiency at which the model's time for one rank's stage (`perf.stage_compute_time`, routing
    skewed by `imbalance`) less its time at shrunken widths (`work_probe.shrunken_widths`: what the per-kernel costs
    and the work of nothing come to, in both) equals the measured growth `measured_s` (full less shrunken); 1 if
    even the peak rate is slower than measured."""
    from ..strategy import Strategy

    p = recipe.parallel
    full = dataclasses.replace(shape_of(recipe, imbalance), hbm_bytes_s=hbm_bytes_s)
    small = dataclasses.replace(shape_of(shrunken_widths(recipe), imbalance), hbm_bytes_s=hbm_bytes_s)
    layers = stage_layers_timed(recipe)
    autoep = Strategy.from_recipe(recipe)[0].moe_backend == "autoep"

    def model_s(mfu: float) -> float:
        return sum(sign * float(stage_compute_time(dataclasses.replace(s, compute_flops=peak_flops * mfu),
                                                   p.micro_batch_size, p.tp, p.ep, layers, p.activation_checkpointing,
                                                   autoep)) for sign, s in ((1, full), (-1, small)))

    if model_s(1.0) >= measured_s:
        return 1.0
    lo, hi = 1e-6, 1.0
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        if model_s(mid) > measured_s:
            lo = mid
        else:
            hi = mid
    return hi


def shrunken(recipe: Recipe, steps: int, output_dir: str | None) -> Recipe:
    """The recipe's layout, depth, vocabulary, data and schedule at shrunken widths (`work_probe.shrunken_widths`),
    no checkpoints, validation or tracking."""
    raw = shrunken_widths(recipe).model_dump()
    raw["train"].update(steps=steps, log_every=1, save_every=0, save_last=False, eval_every=0, resume="never",
                        output_dir=output_dir, warmup_steps=min(recipe.train.warmup_steps, steps - 1))
    raw["tracking"] = {"wandb": {"mode": "disabled"}}
    raw.pop("claims", None)
    return recipe_from_dict(raw)


def _run(command: list[str], what: str, threads: int | None = None) -> None:
    """Run `command` on this machine (wandb off, CPU ranks); a one-line LaunchError with its last words on failure.
    DS_ACCELERATOR=cpu: the probes time CPU ranks and exchange CPU tensors, which an NCCL group would refuse on a
    CUDA machine (a GPU's figures come from `make gpu-check`)."""
    done = subprocess.run(command, capture_output=True, text=True,
                          env=rank_env(threads=threads, WANDB_MODE="disabled", DS_ACCELERATOR="cpu"))
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise LaunchError(f"{what} failed: " + " | ".join(tail))


def _launch(ranks: int, module: str, args: list[str], what: str, threads: int | None = None) -> None:
    """`deepspeed --num_gpus RANKS --module MODULE ARGS` on this machine."""
    _run(deepspeed_command(ranks, module, args, module=True), what, threads)


def _recipe_file(recipe: Recipe, folder: str) -> str:
    import yaml

    path = Path(folder, "recipe.yaml")
    path.write_text(yaml.safe_dump(recipe.model_dump(exclude_none=True)))
    return str(path)


def measure_work(recipe: Recipe, threads: int) -> dict:
    """`work_probe` for the recipe: one rank's work at full and shrunken widths, and its routing skew."""
    from ..strategy import Strategy

    p = recipe.parallel
    if p.ep > 1 and p.tp == 1:  # the recipe's MoE backend, on a stage's ep ranks
        layer = ("DeepSpeed's AutoEP layer" if Strategy.from_recipe(recipe)[0].moe_backend == "autoep" else
                 "DeepSpeed's MoE layer")
        with tempfile.TemporaryDirectory(prefix="moe-calibrate-") as tmp:
            out = Path(tmp, "work.json")
            _launch(p.ep, "moe_model.calibrate.work_probe", ["--recipe", _recipe_file(recipe, tmp), "--out", str(out)],
                    "timing one rank's work on the expert-parallel ranks", threads)
            return {**json.loads(out.read_text()), "where": f"{layer} on {p.ep} ranks"}
    with torch_threads(threads):
        work = rank_model_recipe(recipe)
        full, skew = time_work(work)
        small, _ = time_work(shrunken_widths(work))
    return {"full_s": full, "shrunken_s": small, "routing_imbalance": skew, "where": "one device"}


def measure_step_overhead_s(recipe: Recipe, compute_flops: float, hbm_bytes_s: float, imbalance: float = 1.0,
                            steps: int = 40) -> dict:
    """Median step time of the shrunken recipe on the deepspeed launcher, less the model's time for its arithmetic."""
    ranks = rank_count(recipe)
    with tempfile.TemporaryDirectory(prefix="moe-calibrate-") as tmp:
        small = shrunken(recipe, steps, str(Path(tmp, "run")))
        _run([sys.executable, "-m", "moe_model.cli", "train", _recipe_file(small, tmp), "--num-gpus", str(ranks)],
             "the shrunken run of this layout")
        measured, used = measured_step_time(Path(tmp, "run"), skip=2)
    arithmetic = predict_step_s(small, compute_flops, hbm_bytes_s, imbalance=imbalance)
    return {"ranks": ranks, "shrunken_step_time_s": measured, "steps_used": used,
            "shrunken_arithmetic_s": arithmetic, "step_overhead_s": max(0.0, measured - arithmetic)}


def measure_link_gbps(recipe: Recipe) -> dict:
    """Bandwidth between this machine's ranks for the recipe's own messages (`comm_probe`, launched on as many ranks
    as the recipe): the bytes the model charges for one micro-batch's pipeline exchanges and expert all-to-alls
    over their measured time, less the same calls' time at 4 bytes (latency: already in the fixed overhead). The
    figure replaces `hardware.intra_node_gbps` (every rank is on this machine)."""
    s, p = shape_of(recipe), recipe.parallel
    tokens = p.micro_batch_size * s.S
    act = s.b * tokens * s.D
    a2a = s.k * tokens * s.D * s.b // p.tp
    with tempfile.TemporaryDirectory(prefix="moe-calibrate-") as tmp:
        out = Path(tmp, "comm.json")
        _launch(rank_count(recipe), "moe_model.calibrate.comm_probe",
                ["--p2p-bytes", str(act), "--a2a-bytes", str(a2a), "--out", str(out)], "the communication probe")
        figures = json.loads(out.read_text())
    # weighted as one micro-batch of the busiest stage uses them: one activation + gradient exchange (pp > 1) and
    # 4 all-to-alls per MoE layer (6 with recompute; ep > 1); a pair's all-to-all sends half its buffer away
    p2p_n = 1 if p.pp > 1 or p.ep == 1 else 0
    a2a_n = (4 + 2 * p.activation_checkpointing) * stage_layers_timed(recipe) if p.ep > 1 else 0
    p2p_s = max(0.0, figures["round_trip_p2p_s"] - figures["round_trip_small_s"])
    a2a_s = max(0.0, figures["all_to_all_a2a_s"] - figures["all_to_all_small_s"])
    moved = p2p_n * 2.0 * act + a2a_n * a2a / 2
    figures["intra_node_gbps"] = moved / max(p2p_n * p2p_s + a2a_n * a2a_s, 1e-7) / 1e9
    figures["all_to_all_s_per_micro_batch"] = a2a_n * a2a_s  # inside one rank's work on DeepSpeed's MoE layer
    return figures


def measure_machine(recipe: Recipe, overhead: bool = True, log=None) -> dict:
    """Every figure of the module docstring for `recipe` on this machine, and the `--set` overrides that apply them."""
    from ..train.distributed import cpu_threads_per_rank

    log = log or (lambda message: None)
    ranks = check_local_ranks(recipe)
    threads = cpu_threads_per_rank(ranks)
    with torch_threads(threads):
        log(f"timing products and copies with {threads} thread(s)")
        peak = measure_matmul_tflops()
        tbps = measure_bandwidth_tbps()
        log("timing the GEMM table (the recipe's GEMMs, Mixtral-like and fine-grained experts, grouped and looped)")
        gemms = measure_gemm_table(recipe, threads, tbps * 1e12)
    out = {"ranks": ranks, "threads_per_rank": threads, "matmul_tflops_fp32": peak, "memory_bandwidth_tbps": tbps,
           "gemm_table": gemms}
    # every later fit and prediction prices GEMMs with the fitted shape figures
    recipe = recipe_from_dict(recipe.model_dump(), shape_overrides(gemms))
    if ranks > 1:
        log(f"timing the recipe's messages between {ranks} ranks")
        out["links"] = measure_link_gbps(recipe)
    log("timing one rank's forward + backward at the recipe's widths and at shrunken ones")
    work = measure_work(recipe, threads)
    grown = work["full_s"] - work["shrunken_s"]
    if work["where"] != "one device":  # the all-to-alls' size-dependent time is the links' term, not arithmetic
        grown -= out["links"]["all_to_all_s_per_micro_batch"]
    mfu = fit_mfu(recipe, peak * 1e12, tbps * 1e12, max(grown, 1e-9), work["routing_imbalance"])
    out.update({"rank_forward_backward_s": work["full_s"], "shrunken_forward_backward_s": work["shrunken_s"],
                "work_timed_on": work["where"], "routing_imbalance": work["routing_imbalance"], "mfu": mfu})
    if overhead:
        log(f"training a shrunken copy of the recipe on its layout ({ranks} rank(s), 40 steps) for the fixed cost "
            "of a step")
        out.update(measure_step_overhead_s(recipe, peak * mfu * 1e12, tbps * 1e12, work["routing_imbalance"]))
    out["overrides"] = [f"hardware.peak_tflops={peak:.6g}", f"hardware.mfu={mfu:.4g}",
                        f"hardware.hbm_bandwidth_tbps={tbps:.6g}", "hardware.bandwidth_utilization=1",
                        f"hardware.step_overhead_ms={out.get('step_overhead_s', 0.0) * 1e3:.4g}",
                        *shape_overrides(gemms)]
    if "links" in out:
        out["overrides"].append(f"hardware.intra_node_gbps={out['links']['intra_node_gbps']:.4g}")
    return out


