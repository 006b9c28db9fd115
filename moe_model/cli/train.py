"""`moe train RECIPE [--num-gpus N] [--verbose]`: validate the recipe, refuse a layout that does not fit the GPU budget
(or, on CPU ranks, this host's available memory), then create and check the output folder and start the deepspeed
launcher on `moe_model.train.main` (launch.py builds the command). A refused launch leaves nothing on disk."""

from __future__ import annotations

import argparse
import subprocess
import sys

from ..errors import UsageError
from ..recipe import Recipe
from .arguments import whole_number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-gpus", type=whole_number(1), default=None,
                        help="ranks to start on this machine (default: tp*pp*dp of the recipe, dp 1 if unset)")
    parser.add_argument("--verbose", action="store_true",
                        help="keep DeepSpeed's INFO logs on the ranks (MOE_VERBOSE=1); default: a quiet console")


def cmd_train(recipe: Recipe, args: argparse.Namespace) -> int:
    from ..estimate import launch_refusal
    from ..launch import deepspeed_command, rank_env
    from ..train.main import check_output_dir, check_trainable

    check_trainable(recipe)
    p = recipe.parallel
    ranks = args.num_gpus or p.tp * p.pp * (p.dp or 1)
    from ..train.distributed import launch_env
    from ..train.host_memory import cpu_host_refusal

    refusal = launch_refusal(recipe, args.num_gpus)
    env = launch_env()
    # every rank of this launch runs on this host: on CPU they share its memory
    refusal = refusal or cpu_host_refusal(recipe, args.num_gpus, ranks, env["DS_ACCELERATOR"])
    if refusal:
        print(refusal, file=sys.stderr)
        return 1
    check_output_dir(recipe)  # created once every check before it passed: a refused launch leaves no folder
    from ..train.ownership import OutputLock

    lock = OutputLock(recipe.output_dir)  # a look before any rank starts; rank 0 of the run takes it for real
    busy = lock.acquire()
    lock.release()
    if busy:
        raise UsageError(busy)
    from ..train.console import launcher_log_args

    verbose = getattr(args, "verbose", False)
    command = deepspeed_command(ranks, "moe_model.train.main", ["--recipe", args.recipe], module=True,
                                overrides=args.set, launcher_args=launcher_log_args(verbose))
    if not args.json:
        print("+ " + " ".join(command), file=sys.stderr)
    from ..train.main import run_launcher

    return run_launcher(command, rank_env(verbose=verbose, **env), subprocess.call)  # Ctrl-C: one line, 130
