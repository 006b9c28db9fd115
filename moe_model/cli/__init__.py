"""`moe`: the command line. Every subcommand takes a recipe, `--set key=value` overrides and `--json`.

`report` and `export` take a run folder instead of a recipe.

Exit codes: 0 success, 1 a check said no (e.g. a plan does not fit), 2 bad input (one line on stderr, no traceback).
Each command lives in a module of its own here and prints; the logic it calls returns data. `main` is the one place
that turns a `UserError` (moe_model.errors) into its line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..errors import UsageError, UserError
from ..recipe import Recipe, RecipeError, load_recipe
from . import audit, calibrate, config, estimate, export, params, plan, report, train
from .arguments import OneLineParser

__all__ = ["UsageError", "build_parser", "main"]

RecipeCommand = Callable[[Recipe, argparse.Namespace], int]

# name: (the command, its own flags or None, help)
RECIPE_COMMANDS: dict[str, tuple[RecipeCommand, Callable[[argparse.ArgumentParser], None] | None, str]] = {
    "params": (params.cmd_params, None, "exact parameter counts of the recipe's model"),
    "config": (config.cmd_config, config.add_arguments, "the DeepSpeed JSON config the recipe generates"),
    "train": (train.cmd_train, train.add_arguments, "validate the recipe, then start the deepspeed launcher"),
    "estimate": (estimate.cmd_estimate, estimate.add_arguments,
                 "parameters and memory of every rank; exit 1 when the peak rank does not fit"),
    "plan": (plan.cmd_plan, plan.add_arguments,
             "search the legal parallel strategies that fit; rank them by latency, throughput or cost"),
    "audit": (audit.cmd_audit, None, "check a recipe's claims against computed figures; exit 1 when any claim is wrong"),
    "calibrate": (calibrate.cmd_calibrate, calibrate.add_arguments,
                  "measure this machine's rates, links and a step's fixed cost (or refit from a run)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="moe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, add_arguments, help_text) in RECIPE_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("recipe", help="path of the YAML recipe")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set train.steps=20 (repeatable)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if add_arguments is not None:
            add_arguments(p)
        p.set_defaults(func=func)
    p = sub.add_parser("export", help="a training run's newest checkpoint as a Hugging Face folder",
                       description="Merge pipeline stages, expert files and tensor-parallel shards of a DeepSpeed "
                                   "checkpoint into a Hugging Face folder (safetensors, config, tokenizer).")
    export.add_arguments(p)
    p.set_defaults(run_func=export.cmd_export)
    p = sub.add_parser("report", help="PNGs of a training run: loss curves and expert load",
                       description="Plot a run's metrics.jsonl: train/validation loss and expert-load heatmaps.")
    report.add_arguments(p)
    p.set_defaults(run_func=report.cmd_report)
    return parser


def error_line(command: str, err: UserError, takes_recipe: bool) -> str:
    """The one line shown for a user's mistake: `moe: recipe error: FIELD: ...` for a recipe command's bad recipe
    field (the form users' scripts look for), `moe COMMAND: ...` for everything else."""
    if takes_recipe and isinstance(err, RecipeError):
        return f"moe: recipe error: {err}"
    return f"moe {command}: {err}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    takes_recipe = not hasattr(args, "run_func")
    try:
        if not takes_recipe:
            return args.run_func(args)
        return args.func(load_recipe(args.recipe, args.set), args)
    except UserError as err:
        print(error_line(args.command, err, takes_recipe), file=sys.stderr)
        return 2


