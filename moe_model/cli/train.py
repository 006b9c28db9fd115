"""`moe train RECIPE [--num-gpus N] [--verbose]`: validate the recipe and its output folder, refuse a layout that
does not fit, then start the deepspeed launcher on `moe_model.train.main` (launch.py builds the command)."""

from __future__ import annotations

import argparse
import subprocess
import sys

from ..recipe import Recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-gpus", type=int, default=None,
                        help="ranks to start on this machine (default: tp*pp*dp of the recipe, dp 1 if unset)")
    parser.add_argument("--verbose", action="store_true",
                        help="keep DeepSpeed's INFO logs on the ranks (MOE_VERBOSE=1); default: a quiet console")


def cmd_train(recipe: Recipe, args: argparse.Namespace) -> int:
    from ..estimate import launch_refusal
    from ..launch import deepspeed_command, rank_env
    from ..train.main import check_output_dir, check_trainable

    check_trainable(recipe)
    check_output_dir(recipe)
    refusal = launch_refusal(recipe, args.num_gpus or None)
    if refusal:
        print(refusal, file=sys.stderr)
        return 1
    p = recipe.parallel
    ranks = args.num_gpus or p.tp * p.pp * (p.dp or 1)
    from ..train.console import launcher_log_args
    from ..train.distributed import launch_env

    verbose = getattr(args, "verbose", False)
    command = deepspeed_command(ranks, "moe_model.train.main", ["--recipe", args.recipe], module=True,
                                overrides=args.set, launcher_args=launcher_log_args(verbose))
    if not args.json:
        print("+ " + " ".join(command), file=sys.stderr)
    return subprocess.call(command, env=rank_env(verbose=verbose, **launch_env()))
