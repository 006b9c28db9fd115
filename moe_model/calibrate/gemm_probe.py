"""The GEMM table: this machine's time for the GEMMs MoE layers run, and the shape figures fitted to it.

Measured (torch, this process, the threads a rank of the recipe gets), median of repeated timings after a warm-up:
- the recipe's own GEMMs, forward and backward (`perf.layer_gemms` of its layout, each with its two transposed
  backward products), at its real row counts per expert;
- a Mixtral-like MoE layer scaled to this machine (8 experts of width 1792 over hidden 512, top-2 of 512 tokens: 128
  rows per expert) and a fine-grained one (64 experts of width 128 over hidden 512, top-8 of 512 tokens: 64 rows per
  expert), each expert product grouped (`torch._grouped_mm`, one call for all experts: aten's per-expert loop on a
  CPU) and as a Python loop of `torch.mm` (DeepSpeed's expert modules), and a dense projection beside them;
- one kernel's fixed cost: the median time of a 16-element `torch.add` (dispatch, allocation, the smallest kernel).
Fitted: `hardware.sm_count` = the threads (the units that run output tiles at once), the output tile and the K
depth at half rate from grids, and the rate `peak * mfu` of the GEMM term, minimising the squared log error of
`kernels.gemm_seconds` over the table; the fixed cost is measured, not fitted. The table's rows keep measured and
modelled time side by side (`moe calibrate --json`, `gemm_table`).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from ..estimate.kernels import gemm_seconds
from ..estimate.perf import layer_gemms, shape_of
from ..recipe import Recipe
from .timing import measure_bandwidth_tbps, synced_median_seconds

TILES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
K_HALVES = (0.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)

# (label, hidden D, expert width I, experts on the rank E, top-k, tokens T per rank): the catalogue's MoE layers.
# CPU: at this machine's size; GPU: the real layers at 4096 tokens (Qwen3-30B-A3B on one GPU: 128 experts of 256
# rows; over ep 8: 16 local experts of 2048 rows)
LAYERS = {
    "cpu": (("Mixtral-like", 512, 1792, 8, 2, 512), ("fine-grained", 512, 128, 64, 8, 512)),
    "cuda": (("Mixtral-8x7B", 4096, 14336, 8, 2, 4096), ("Qwen3-30B-A3B", 2048, 768, 128, 8, 4096),
             ("Qwen3-30B-A3B ep8", 2048, 768, 16, 8, 4096)),
}


@dataclasses.dataclass(frozen=True)
class Gemm:
    label: str
    M: float  # rows (per group)
    N: int
    K: int
    groups: int = 1
    grouped: bool = True


def catalogue(device: str = "cpu") -> list[Gemm]:
    """The Mixtral-like and fine-grained experts (gate+up, down, and down's weight gradient whose depth is an
    expert's rows), grouped and looped, and a dense projection of the same tokens (`LAYERS` of the device)."""
    rows = []
    for label, D, I, E, k, T in LAYERS[device]:
        r = T * k // E  # rows per local expert (balanced: ep ranks' T tokens over E x ep experts)
        for grouped in (True, False):
            how = "grouped" if grouped else "loop"
            rows += [Gemm(f"{label} experts gate+up ({how})", r, 2 * I, D, E, grouped),
                     Gemm(f"{label} experts down ({how})", r, D, I, E, grouped),
                     Gemm(f"{label} experts dW down ({how})", I, D, r, E, grouped)]
        rows.append(Gemm(f"{label} dense projection", T, D, D))
    return rows


def recipe_gemms(recipe: Recipe) -> list[Gemm]:
    """The recipe's own layer GEMMs on one rank of its layout: each forward product and its two backward ones."""
    from ..strategy import Strategy

    p = Strategy.from_recipe(recipe)[0]
    s = shape_of(recipe)
    out, seen = [], set()
    for name, gemms in layer_gemms(s, p.micro_batch_size, p.tp, p.ep, p.moe_backend == "autoep").items():
        for M, N, K, groups, grouped in gemms:
            grouped = bool(grouped)
            for what, shape in (("", (M, N, K)), (" dX", (M, K, N)), (" dW", (K, N, M))):
                key = (*[round(float(v), 3) for v in shape], int(groups), grouped)
                if key not in seen and float(shape[0]) > 0:
                    seen.add(key)
                    out.append(Gemm(f"recipe {name}{what}", float(shape[0]), int(shape[1]), int(shape[2]),
                                    int(groups), grouped))
    return out


def time_gemm(g: Gemm, repeats: int = 5, device: str = "cpu", dtype=None) -> float:
    """Median seconds of `g` on `device` in `dtype` (fp32 by default): one `torch._grouped_mm` over its groups (on
    a CPU aten's per-expert loop), or a Python loop of `torch.mm` (DeepSpeed's expert modules)."""
    import torch

    dtype = dtype or torch.float32
    M = max(1, int(round(g.M)))
    # CUDA's grouped kernel needs 16-byte rows (bf16: widths a multiple of 8; `grouped_ffn.grouped_mm_refusal`):
    # a mean row count used as a depth is rounded up to one
    K, N = (-(-int(v) // 8) * 8 if device == "cuda" else max(1, int(v)) for v in (g.K, g.N))
    x = torch.randn(g.groups * M, K, device=device, dtype=dtype)
    w = torch.randn(g.groups, N, K, device=device, dtype=dtype).transpose(-2, -1)  # [E, K, N], column-major
    timer = synced_median_seconds(device)
    if g.groups == 1:
        return timer(lambda: torch.mm(x, w[0]), repeats)
    if g.grouped:
        offs = torch.arange(M, g.groups * M + 1, M, dtype=torch.int32, device=device)
        return timer(lambda: torch._grouped_mm(x, w, offs=offs), repeats)
    chunks = x.split(M)
    return timer(lambda: [torch.mm(c, w[e]) for e, c in enumerate(chunks)], repeats)


def measure_kernel_s(device: str = "cpu", count: int = 200) -> float:
    """One small kernel's cost: `count` 16-element adds issued back to back (dispatch, output allocation, launch),
    the median over 5 timings, per add."""
    import torch

    a, b = torch.ones(16, device=device), torch.ones(16, device=device)

    def many():
        for _ in range(count):
            torch.add(a, b)
    return synced_median_seconds(device)(many, 5, warmup=2) / count


RATES = np.logspace(8, 16, 800)  # FLOP/s: the candidate rates of a fit


def best_rate(s, table: list[Gemm], measured: list[float]) -> tuple[float, float, np.ndarray]:
    """(squared log error, rate, the table's times) of `kernels.gemm_seconds` under `s`'s figures at the candidate
    rate (`RATES`) that times `table` closest to `measured`."""
    M, N, K = (np.array([getattr(g, f) for g in table], dtype=float) for f in "MNK")
    groups = np.array([g.groups for g in table], dtype=float)
    grouped = np.array([g.grouped for g in table])
    predicted = gemm_seconds(dataclasses.replace(s, compute_flops=RATES[:, None]), M, N, K, groups, grouped)
    errors = np.sum(np.log(predicted / np.asarray(measured)) ** 2, axis=1)  # [rates]
    i = int(np.argmin(errors))
    return float(errors[i]), float(RATES[i]), predicted[i]


def fit_shape_figures(recipe: Recipe, table: list[Gemm], measured: list[float], threads: int, hbm_bytes_s: float,
                      kernel_s: float, b: int = 4) -> dict:
    """The tile, K depth and rate minimising the squared log error of `kernels.gemm_seconds` over `table`, with
    `sm_count` = `threads`, the measured bandwidth and kernel cost; and beside it the one-efficiency roofline
    (`devices.FLAT` figures: no tiles, no K depth, no kernel cost) at its own best rate, the model before the shape
    terms."""
    base = dataclasses.replace(shape_of(recipe), b=b, hbm_bytes_s=hbm_bytes_s, sm_count=threads, launch_s=kernel_s)
    best = None
    for tm, tn, kh in itertools.product(TILES, TILES, K_HALVES):
        error, rate, predicted = best_rate(dataclasses.replace(base, gemm_tile=(tm, tn), gemm_k_half=kh), table,
                                           measured)
        if best is None or error < best[0]:
            best = (error, (tm, tn), kh, rate, predicted)
    error, tile, kh, rate, predicted = best
    flat_error, flat_rate, flat = best_rate(dataclasses.replace(base, sm_count=0, gemm_k_half=0.0, launch_s=0.0),
                                            table, measured)
    return {"sm_count": threads, "gemm_tile": list(tile), "gemm_k_half": kh, "gemm_rate_flops": rate,
            "kernel_launch_us": kernel_s * 1e6, "rms_log_error": float(np.sqrt(error / len(table))),
            "one_efficiency_rms_log_error": float(np.sqrt(flat_error / len(table))),
            "one_efficiency_rate_flops": flat_rate, "predicted_s": [float(v) for v in predicted],
            "one_efficiency_s": [float(v) for v in flat]}


def measure_gemm_table(recipe: Recipe, threads: int, hbm_bytes_s: float, device: str = "cpu", dtype=None) -> dict:
    """The GEMM table of this machine for `recipe` (module docstring), the fitted shape figures, and beside them the
    one-efficiency roofline at its own best rate (the model before the shape terms). On CUDA `threads` is the SM
    count and `dtype` bf16."""
    import torch

    dtype = dtype or torch.float32
    b = torch.finfo(dtype).bits // 8
    table = recipe_gemms(recipe) + catalogue(device)
    measured = [time_gemm(g, device=device, dtype=dtype) for g in table]
    kernel_s = measure_kernel_s(device)
    fit = fit_shape_figures(recipe, table, measured, threads, hbm_bytes_s, kernel_s, b)
    fit.update(device=device, dtype=str(dtype).removeprefix("torch."))
    rows = [{"gemm": g.label, "M": g.M, "N": g.N, "K": g.K, "groups": g.groups, "grouped": g.grouped,
             "measured_s": m, "measured_gflops": 2.0 * g.M * g.N * g.K * g.groups / m / 1e9,
             "one_efficiency_s": o, "by_shape_s": p}
            for g, m, o, p in zip(table, measured, fit.pop("one_efficiency_s"), fit.pop("predicted_s"))]
    return {**fit, "rows": rows}


def shape_overrides(fit: dict) -> list[str]:
    """`--set hardware.*` of the fitted shape figures."""
    tm, tn = fit["gemm_tile"]
    return [f"hardware.sm_count={fit['sm_count']}", f"hardware.gemm_tile=[{tm}, {tn}]",
            f"hardware.gemm_k_half={fit['gemm_k_half']:g}", f"hardware.kernel_launch_us={fit['kernel_launch_us']:.3g}"]


def main(argv: list[str] | None = None) -> int:
    """`python -m moe_model.calibrate.gemm_probe --recipe R --device cuda --out F.json` (make gpu-check's gemm part):
    the table on this device (bf16 on CUDA, fp32 on a CPU), its fit, and the `hardware:` overrides it gives, written
    to F.json and beside it F.yaml (a recipe's `base:` or `--set` lines)."""
    import argparse
    import json
    from pathlib import Path

    import torch
    import yaml

    from ..recipe import load_recipe

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe)
    if args.device == "cuda":
        units, dtype = torch.cuda.get_device_properties(0).multi_processor_count, torch.bfloat16
    else:
        units, dtype = torch.get_num_threads(), torch.float32
    hbm_bytes_s = measure_bandwidth_tbps(512 if args.device == "cuda" else 128, device=args.device) * 1e12
    table = measure_gemm_table(recipe, units, hbm_bytes_s, args.device, dtype)
    table["hbm_bytes_s"] = hbm_bytes_s
    table["overrides"] = shape_overrides(table)
    args.out.write_text(json.dumps(table, indent=2) + "\n")
    tm, tn = table["gemm_tile"]
    args.out.with_suffix(".yaml").write_text(
        f"# the GEMM-shape figures moe_model.calibrate.gemm_probe measured on {args.device} ({table['dtype']}), "
        f"rms log error {table['rms_log_error']:.3f} (one efficiency: {table['one_efficiency_rms_log_error']:.3f})\n"
        + yaml.safe_dump({"hardware": {"sm_count": table["sm_count"], "gemm_tile": [tm, tn],
                                       "gemm_k_half": table["gemm_k_half"],
                                       "kernel_launch_us": round(table["kernel_launch_us"], 3)}}))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
