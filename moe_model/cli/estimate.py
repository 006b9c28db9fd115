"""`moe estimate RECIPE`: parameters and per-rank memory of every pipeline stage; exit 1 when the peak rank does
not fit the GPU budget. `--json` prints DESIGN.md's keys (plus the per-stage table, layout and assumptions).

Step time, throughput and MFU come from the performance model (estimate/perf.py) for the same layout.
"""

from __future__ import annotations

import argparse
import json

from ..estimate.estimate import Estimate, estimate
from ..estimate.memory import Assumptions
from ..recipe import Recipe
from ..units import GB


def _at_least(low: float, kind: type = float):
    def parse(text: str):
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value
    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The estimate's own flags (the assumptions it cannot read from the recipe)."""
    defaults = Assumptions()
    parser.add_argument("--gpus", type=_at_least(1, int), default=None,
                        help="world size: dp = gpus / (tp*pp) (default: parallel.dp, else the smallest legal dp = ep)")
    parser.add_argument("--imbalance", type=_at_least(1.0), default=defaults.imbalance,
                        help=f"busiest expert's load over the mean for dropless ep > 1 (default {defaults.imbalance})")
    parser.add_argument("--reserve-gb", type=_at_least(0.0), default=defaults.reserve_bytes / GB,
                        help="CUDA context + communicators outside PyTorch's allocator, GB "
                             f"(default {defaults.reserve_bytes / GB})")
    parser.add_argument("--fragmentation", type=_fraction, default=defaults.fragmentation,
                        help=f"allocator overhead as a fraction of allocated bytes (default {defaults.fragmentation})")


def assumptions_from(args: argparse.Namespace) -> Assumptions:
    """The assumptions the flags set; defaults where `add_arguments` was not applied to the parser."""
    defaults = Assumptions()
    return Assumptions(imbalance=getattr(args, "imbalance", defaults.imbalance),
                       reserve_bytes=int(getattr(args, "reserve_gb", defaults.reserve_bytes / GB) * GB),
                       fragmentation=getattr(args, "fragmentation", defaults.fragmentation))


def cmd_estimate(recipe: Recipe, args: argparse.Namespace) -> int:
    result = estimate(recipe, getattr(args, "gpus", None), assumptions_from(args))
    if getattr(args, "json", False):
        print(json.dumps(result.as_json(), indent=2))
    else:
        print_estimate(result, recipe)
    return 0 if result.fits else 1


def _gb(value: int) -> str:
    return f"{value / GB:.2f}"


def print_estimate(result: Estimate, recipe: Recipe) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 132))  # the table needs ~120 columns, even when piped
    c, a = result.counts, result.assumptions
    dp_note = " (assumed: smallest legal dp = ep; set parallel.dp or --gpus)" if result.dp_assumed else ""
    console.print(f"[bold]{result.recipe}[/]: {c.total:,} parameters ({c.total / 1e9:.3f} B), "
                  f"{c.active_per_token:,} active per token")
    console.print(f"layout tp{result.tp} pp{result.pp} ep{result.ep} dp{result.dp}{dp_note} = {result.gpus} GPUs; "
                  f"ZeRO-{result.zero_stage}, {result.precision}, micro-batch {recipe.parallel.micro_batch_size} x "
                  f"{recipe.train.seq_len} tokens, {result.micro_steps} micro-batches per step, activation "
                  f"checkpointing {'on' if recipe.parallel.activation_checkpointing else 'off'}")
    table = Table(title="memory per rank, GB (1e9 bytes)", caption=(
        f"other = gradient bucket ({a.reduce_bucket_elements:.0e} elements) + loss-head gradients or optimizer-step "
        f"transients + fragmentation ({a.fragmentation:.0%}) + reserve ({a.reserve_bytes / GB:.1f} GB); headroom "
        f"for routing imbalance {a.imbalance:g}x (ep > 1, dropless). All are stated assumptions (see "
        "docs/estimator.md)."))
    columns = ("stage", "ranks", "layers", "in flight", "params", "grads", "optimizer", "activations",
               "imbalance headroom", "other", "total", "fits")
    for column in columns:
        table.add_column(column, justify="right")
    for s in result.stages:
        fits = s.total_bytes <= result.budget_bytes
        table.add_row(str(s.stage), f"{s.first_rank}..{s.first_rank + s.ranks - 1}", str(s.layers), str(s.in_flight),
                      _gb(s.params_bytes), _gb(s.grads_bytes), _gb(s.optimizer_bytes), _gb(s.activations_bytes),
                      _gb(s.imbalance_headroom_bytes), _gb(s.other_bytes),
                      f"[bold]{_gb(s.total_bytes)}[/]", "[green]yes[/]" if fits else "[red]no[/]")
    console.print(table)
    if result.unpriced:
        console.print(f"[yellow]not priced yet[/]: {', '.join(result.unpriced)}; the parameters and model states hold "
                      "them, the activations and step time leave them out (an approximation)")
    peak = result.peak
    verdict = "[green]fits[/]" if result.fits else "[red]does not fit[/]"
    console.print(f"peak: rank {peak.first_rank} (stage {peak.stage}, at the {peak.peak_at}) "
                  f"{_gb(peak.total_bytes)} GB of {_gb(result.budget_bytes)} GB: {verdict}")
    perf = result.performance
    if perf is not None:
        hw = recipe.hardware
        gemms = (f"GEMMs by shape ({hw.gpu or 'stated figures'}: {hw.sm_count} SMs, {hw.gemm_tile[0]}x{hw.gemm_tile[1]} "
                 f"tiles, {hw.kernel_launch_us:g} us a kernel)" if hw.sm_count or hw.kernel_launch_us
                 else "every GEMM at hardware.mfu (no hardware.gpu)")
        console.print(f"predicted step {perf.step_time_s:.3f} s, {perf.throughput_seq_per_s:.1f} sequences/s "
                      f"({perf.throughput_tokens_per_s:,.0f} tokens/s), MFU {perf.mfu:.1%}, pipeline bubble "
                      f"{perf.bubble_fraction:.0%} (performance model: roofline, {gemms}, no overlap, interconnect "
                      f"ASSUMED {hw.intra_node_gbps:g}/{hw.inter_node_gbps:g} GB/s intra/inter)")
