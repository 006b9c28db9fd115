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
from .timing import median_seconds

TILES = (1, 2, 4, 8, 16, 32, 64, 128)
K_HALVES = (0.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)

# (label, hidden D, expert width I, experts E, top-k, tokens T): the catalogue's MoE layers at CPU size
LAYERS = (("Mixtral-like", 512, 1792, 8, 2, 512), ("fine-grained", 512, 128, 64, 8, 512))


@dataclasses.dataclass(frozen=True)
class Gemm:
    label: str
    M: float  # rows (per group)
    N: int
    K: int
    groups: int = 1
    grouped: bool = True


def catalogue() -> list[Gemm]:
    """The scaled Mixtral-like and fine-grained experts (gate+up, down, and down's weight gradient whose depth is an
    expert's rows), grouped and looped, and a dense projection of the same tokens."""
    rows = []
    for label, D, I, E, k, T in LAYERS:
        r = T * k // E
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


def time_gemm(g: Gemm, repeats: int = 5) -> float:
    """Median seconds of `g` in fp32 on this machine: one `torch._grouped_mm` over its groups, or a loop of mm."""
    import torch

    M = max(1, int(round(g.M)))
    x = torch.randn(g.groups * M, g.K)
    w = torch.randn(g.groups, g.K, g.N)
    if g.groups == 1:
        return median_seconds(lambda: torch.mm(x, w[0]), repeats)
    if g.grouped:
        offs = torch.arange(M, g.groups * M + 1, M, dtype=torch.int32)
        return median_seconds(lambda: torch._grouped_mm(x, w, offs=offs), repeats)
    chunks = x.split(M)
    return median_seconds(lambda: [torch.mm(c, w[e]) for e, c in enumerate(chunks)], repeats)


def measure_kernel_s(repeats: int = 200) -> float:
    """One small kernel's wall time: a 16-element add (dispatch, output allocation, the work of nothing)."""
    import torch

    a, b = torch.ones(16), torch.ones(16)
    return median_seconds(lambda: torch.add(a, b), repeats, warmup=20)


def fit_shape_figures(recipe: Recipe, table: list[Gemm], measured: list[float], threads: int, hbm_bytes_s: float,
                      kernel_s: float) -> dict:
    """The tile, K depth and rate minimising the squared log error of `kernels.gemm_seconds` over `table`, with
    `sm_count` = `threads`, the measured bandwidth and kernel cost."""
    base = dataclasses.replace(shape_of(recipe), b=4, hbm_bytes_s=hbm_bytes_s, sm_count=threads, launch_s=kernel_s)
    t = np.asarray(measured)
    M, N, K = (np.array([getattr(g, f) for g in table], dtype=float) for f in "MNK")
    groups = np.array([g.groups for g in table], dtype=float)
    grouped = np.array([g.grouped for g in table])
    rates = np.logspace(8, 13, 500)[:, None]  # FLOP/s, one row per candidate
    best = None
    for tm, tn, kh in itertools.product(TILES, TILES, K_HALVES):
        s = dataclasses.replace(base, gemm_tile=(tm, tn), gemm_k_half=kh, compute_flops=rates)
        predicted = gemm_seconds(s, M, N, K, groups, grouped)  # [rates, table]
        errors = np.sum(np.log(predicted / t) ** 2, axis=1)
        i = int(np.argmin(errors))
        if best is None or errors[i] < best[0]:
            best = (float(errors[i]), tm, tn, kh, float(rates[i, 0]), predicted[i])
    error, tm, tn, kh, rate, predicted = best
    return {"sm_count": threads, "gemm_tile": [tm, tn], "gemm_k_half": kh, "gemm_rate_flops": rate,
            "kernel_launch_us": kernel_s * 1e6, "rms_log_error": float(np.sqrt(error / len(table))),
            "predicted_s": [float(v) for v in predicted]}


def flat_seconds(g: Gemm, rate: float, hbm_bytes_s: float) -> float:
    """The one-efficiency roofline's time for `g` at `rate` (what the model said before the shape terms)."""
    flops = 2.0 * g.M * g.N * g.K * g.groups
    return max(flops / rate, 4.0 * g.groups * (g.M * g.K + g.K * g.N + g.M * g.N) / hbm_bytes_s)


def measure_gemm_table(recipe: Recipe, threads: int, hbm_bytes_s: float) -> dict:
    """The GEMM table of this machine for `recipe` (module docstring), the fitted shape figures, and beside them the
    one-efficiency roofline at its own best rate (the model before the shape terms)."""
    table = recipe_gemms(recipe) + catalogue()
    measured = [time_gemm(g) for g in table]
    kernel_s = measure_kernel_s()
    fit = fit_shape_figures(recipe, table, measured, threads, hbm_bytes_s, kernel_s)
    # the one-efficiency roofline at its own best rate over the same table (the model before the shape terms)
    rates = np.logspace(8, 13, 500)
    flat = np.array([[flat_seconds(g, rate, hbm_bytes_s) for g in table] for rate in rates])
    flat_errors = np.sum(np.log(flat / np.asarray(measured)) ** 2, axis=1)
    i = int(np.argmin(flat_errors))
    fit.update(one_efficiency_rms_log_error=float(np.sqrt(flat_errors[i] / len(table))),
               one_efficiency_rate_flops=float(rates[i]))
    rows = [{"gemm": g.label, "M": g.M, "N": g.N, "K": g.K, "groups": g.groups, "grouped": g.grouped,
             "measured_s": m, "measured_gflops": 2.0 * g.M * g.N * g.K * g.groups / m / 1e9,
             "one_efficiency_s": o, "by_shape_s": p}
            for g, m, o, p in zip(table, measured, flat[i], fit.pop("predicted_s"))]
    return {**fit, "rows": rows}


def shape_overrides(fit: dict) -> list[str]:
    """`--set hardware.*` of the fitted shape figures."""
    tm, tn = fit["gemm_tile"]
    return [f"hardware.sm_count={fit['sm_count']}", f"hardware.gemm_tile=[{tm}, {tn}]",
            f"hardware.gemm_k_half={fit['gemm_k_half']:g}", f"hardware.kernel_launch_us={fit['kernel_launch_us']:.3g}"]
