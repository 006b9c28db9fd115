"""`moe`: the command line. Every subcommand takes a recipe, `--set key=value` overrides and `--json`.

Exit codes: 0 success, 1 a check said no (e.g. a plan does not fit), 2 bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from .estimate.command import add_arguments as add_estimate_arguments
from .estimate.command import cmd_estimate
from .estimate.planner import add_arguments as add_plan_arguments
from .estimate.planner import cmd_plan
from .estimate.audit import cmd_audit
from .estimate.calibrate import add_arguments as add_calibrate_arguments
from .estimate.calibrate import cmd_calibrate
from .recipe import Recipe, RecipeError, load_recipe
from .report.command import add_arguments as add_report_arguments
from .report.command import cmd_report


class UsageError(Exception):
    """Bad input that is not a recipe field (a path, a flag)."""


def _print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2))


def cmd_params(recipe: Recipe, args: argparse.Namespace) -> int:
    from .estimate import count_params

    counts = count_params(recipe.moe_config())
    if args.json:
        _print_json({"recipe": recipe.name, "params": counts.as_dict()})
        return 0
    from rich.console import Console
    from rich.table import Table

    m = recipe.model
    table = Table(title=f"{recipe.name}: parameters", caption=(
        f"{m.num_hidden_layers} layers x {m.num_local_experts} experts ({m.hidden_act}), hidden {m.hidden_size}, "
        f"expert FFN {m.intermediate_size}, top-{m.num_experts_per_tok}, vocab {m.vocab_size}"))
    table.add_column("count")
    table.add_column("parameters", justify="right")
    table.add_column("", justify="right")
    for name, value in counts.as_dict().items():
        table.add_row(name, f"{value:,}", f"{value / 1e9:.3f} B")
    Console().print(table)
    return 0


def cmd_config(recipe: Recipe, args: argparse.Namespace) -> int:
    from .train.ds_config import deepspeed_config

    text = json.dumps(deepspeed_config(recipe), indent=2) + "\n"
    if args.output:
        out = Path(args.output)
        if not out.parent.is_dir():
            raise UsageError(f"-o {args.output}: folder {str(out.parent)!r} does not exist; create it first")
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)  # never a half-written config
    else:
        sys.stdout.write(text)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmd_train(recipe: Recipe, args: argparse.Namespace) -> int:
    from .train.main import check_output_dir, check_trainable

    check_trainable(recipe)
    check_output_dir(recipe)
    from .estimate import launch_refusal

    refusal = launch_refusal(recipe, args.num_gpus or None)
    if refusal:
        print(refusal, file=sys.stderr)
        return 1
    p = recipe.parallel
    ranks = args.num_gpus or p.tp * p.pp * (p.dp or 1)
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    if launcher is None:
        raise UsageError("the deepspeed launcher is not on PATH; install the project (make install)")
    command = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()),
               "--module", "moe_model.train.main", "--recipe", args.recipe]
    for assignment in args.set:
        command += ["--set", assignment]
    if not args.json:
        print("+ " + " ".join(command), file=sys.stderr)
    return subprocess.call(command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, tuple[Callable[[Recipe, argparse.Namespace], int], str]] = {
        "params": (cmd_params, "exact parameter counts of the recipe's model"),
        "config": (cmd_config, "the DeepSpeed JSON config the recipe generates"),
        "train": (cmd_train, "validate the recipe, then start the deepspeed launcher"),
        "estimate": (cmd_estimate, "parameters and memory of every rank; exit 1 when the peak rank does not fit"),
        "plan": (cmd_plan, "search the legal parallel strategies that fit; rank them by latency, throughput or cost"),
        "audit": (cmd_audit, "check a recipe's claims against computed figures; exit 1 when any claim is wrong"),
        "calibrate": (cmd_calibrate, "measure this machine's rates, links and a step's fixed cost (or refit from a run)"),
    }
    for name, (func, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("recipe", help="path of the YAML recipe")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set train.steps=20 (repeatable)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "config":
            p.add_argument("-o", "--output", help="write to this file instead of stdout")
        if name == "estimate":
            add_estimate_arguments(p)
        if name == "plan":
            add_plan_arguments(p)
        if name == "calibrate":
            add_calibrate_arguments(p)
        if name == "train":
            p.add_argument("--num-gpus", type=int, default=None,
                           help="ranks to start on this machine (default: tp*pp*dp of the recipe, dp 1 if unset)")
        p.set_defaults(func=func)
    add_run_commands(sub)
    report = sub.add_parser("report", help="PNGs of a training run: loss curves and expert load",
                            description="Plot a run's metrics.jsonl: train/validation loss and expert-load heatmaps.")
    add_report_arguments(report)
    report.set_defaults(run_func=cmd_report)
    return parser


def cmd_export(args: argparse.Namespace) -> int:
    from .train.export import export

    out = export(Path(args.run_dir), Path(args.out_dir), args.format, args.tag)
    if args.json:
        _print_json({"exported": str(out), "format": args.format})
    else:
        print(f"wrote {out} ({args.format}); load it with AutoModelForCausalLM.from_pretrained({str(out)!r}"
              + (", trust_remote_code=True)" if args.format == "native" else ")"))
    return 0


def add_run_commands(sub) -> None:
    """Commands that take a finished run's folder instead of a recipe."""
    p = sub.add_parser("export", help="a training run's newest checkpoint as a Hugging Face folder",
                       description="Merge pipeline stages, expert files and tensor-parallel shards of a DeepSpeed "
                                   "checkpoint into a Hugging Face folder (safetensors, config, tokenizer).")
    p.add_argument("run_dir", help="the output_dir of a training run")
    p.add_argument("out_dir", help="the folder to create")
    p.add_argument("--format", choices=("native", "mixtral"), default="native",
                   help="native: MoEForCausalLM; mixtral: transformers' MixtralForCausalLM (silu experts only)")
    p.add_argument("--tag", default=None, help="a checkpoint tag (default: the newest complete one)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run_func=cmd_export)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "run_func"):
        try:
            return args.run_func(args)
        except RecipeError as err:
            print(f"moe {args.command}: {err}", file=sys.stderr)
            return 2
    try:
        recipe = load_recipe(args.recipe, args.set)
        return args.func(recipe, args)
    except RecipeError as err:
        print(f"moe: recipe error: {err}", file=sys.stderr)
        return 2
    except UsageError as err:
        print(f"moe: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
