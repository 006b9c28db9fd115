"""`moe plan RECIPE [--max-gpus N] [--objective latency|throughput|cost] [--top K] [--plot PNG]`: the planner's
ranked strategies (estimate/planner.py) as tables or JSON, and the latency-versus-GPUs plot (report/plots.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UsageError
from ..estimate.planner import OBJECTIVES, Plan, plan
from ..recipe import Recipe
from ..report.strategy import describe
from .arguments import whole_number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-gpus", type=whole_number(1), default=None, help="largest world size to consider")
    parser.add_argument("--objective", choices=OBJECTIVES, default="latency",
                        help="latency: shortest step; throughput: most sequences/s; cost: fewest GPU-seconds per step")
    parser.add_argument("--top", type=whole_number(0), default=None,
                        help="strategies to show (default 10) or, with --json, to emit (default 50); 0: all fitting")
    parser.add_argument("--plot", metavar="PNG", default=None, help="write the latency-versus-GPUs plot here")


def plot(result: Plan, path: str) -> None:
    """The plan's latency-versus-GPUs PNG at `path`, the recipe's own strategy starred."""
    from ..report.plots import plot_pareto

    if not Path(path).resolve().parent.is_dir():
        raise UsageError(f"--plot: folder {str(Path(path).parent)!r} does not exist; create it first")
    plot_pareto(result.candidates, Path(path), f"{result.recipe}: latency versus GPUs", own=result.own)


def cmd_plan(recipe: Recipe, args: argparse.Namespace) -> int:
    result = plan(recipe, getattr(args, "max_gpus", None), getattr(args, "objective", "latency"))
    top = getattr(args, "top", None)
    top = 10 if top is None else top or len(result.candidates)  # 0: every fitting strategy, as --help says
    if getattr(args, "plot", None):
        plot(result, args.plot)
    if getattr(args, "json", False):
        print(json.dumps(result.as_json(top=50 if getattr(args, "top", None) is None else args.top), indent=2))
        return 0 if result.candidates else 1
    print_plan(result, recipe, top)
    return 0 if result.candidates else 1


def print_plan(result: Plan, recipe: Recipe, top: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 132))
    console.print(f"[bold]{result.recipe}[/]: searched {result.searched:,} combinations, {result.legal:,} legal, "
                  f"{result.fitting:,} fit {recipe.hardware.gpu_memory_gb:g} GB, in {result.search_time_s:.2f} s; "
                  f"objective {result.objective}")
    table = Table(title=f"top {min(top, len(result.candidates))} strategies")
    for column in ("#", "strategy", "GPUs", "step s", "seq/s", "tokens/s", "peak GB"):
        table.add_column(column, justify="right")
    for i, c in enumerate(result.candidates[:top], 1):
        table.add_row(str(i), describe(c["parallel"]), str(c["gpus"]), f"{c['step_time_s']:.3f}",
                      f"{c['throughput_seq_per_s']:.1f}", f"{c['throughput_seq_per_s'] * recipe.train.seq_len:,.0f}",
                      f"{c['peak_bytes'] / 1e9:.1f}")
    console.print(table)
    front = Table(title="latency versus GPUs (Pareto front)")
    for column in ("GPUs", "strategy", "step s", "seq/s"):
        front.add_column(column, justify="right")
    own = result.own or {}
    placed = False
    for c in result.pareto:
        if not placed and "gpus" in own and own["gpus"] <= c["gpus"]:
            front.add_row(f"[yellow]{own['gpus']}[/]", f"[yellow]recipe's own: {describe(own['parallel'])}[/]",
                          f"[yellow]{own['step_time_s']:.3f}[/]", f"[yellow]{own['throughput_seq_per_s']:.1f}[/]")
            placed = True
        front.add_row(str(c["gpus"]), describe(c["parallel"]), f"{c['step_time_s']:.3f}",
                      f"{c['throughput_seq_per_s']:.1f}")
    if not placed and "gpus" in own:
        front.add_row(f"[yellow]{own['gpus']}[/]", f"[yellow]recipe's own: {describe(own['parallel'])}[/]",
                      f"[yellow]{own['step_time_s']:.3f}[/]", f"[yellow]{own['throughput_seq_per_s']:.1f}[/]")
    console.print(front)
    if "error" in own:
        console.print(f"recipe's own strategy: {own['error']}")
    elif own:
        where = (f"rank {result.own_rank} of {result.fitting}" if result.own_rank else
                 f"[red]does not fit[/] (peak {own['peak_bytes'] / 1e9:.1f} GB)")
        console.print(f"recipe's own strategy {describe(own['parallel'])} on {own['gpus']} GPUs"
                      f"{' (dp assumed = ep)' if own.get('dp_assumed') else ''}: step {own['step_time_s']:.3f} s, "
                      f"{own['throughput_seq_per_s']:.1f} seq/s, {where}")
    console.print(f"interconnect ASSUMED: {recipe.hardware.gpus_per_node} GPUs per node, "
                  f"{recipe.hardware.intra_node_gbps:g} GB/s intra-node, {recipe.hardware.inter_node_gbps:g} GB/s "
                  "inter-node per GPU; no compute/communication overlap (see moe_model/estimate/perf.py)")
