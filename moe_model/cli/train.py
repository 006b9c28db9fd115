"""`moe train RECIPE [--num-gpus N] [--hostfile H [--node-rank K] [--master-addr A]] [--verbose]`: validate the recipe,
refuse a layout that does not fit the GPU budget (or, on CPU ranks, this host's available memory), then create and
check the output folder and start the deepspeed launcher on `moe_model.train.main` (launch.py builds the command). A
refused launch leaves nothing on disk.

Where the ranks run (`train.cluster`): one node, `--num-gpus N` ranks (default: tp x pp x dp of the recipe; with dp
unset, every GPU CUDA_VISIBLE_DEVICES leaves, or dp 1 on CPU ranks), on the GPUs CUDA_VISIBLE_DEVICES names. Several
nodes, `--hostfile H` (DeepSpeed's format, `HOST slots=N` a line): DeepSpeed's pdsh runner starts every node, and
the variables the ranks need go to `OUTPUT_DIR/.deepspeed_env` (pdsh forwards little else); `--node-rank K` instead
starts node K's ranks here without ssh (run it on every node, each with its K, and the same `--master-addr` and
`--master-port`)."""

from __future__ import annotations

import argparse
import subprocess
import sys

from ..errors import UsageError
from ..recipe import Recipe
from .arguments import whole_number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-gpus", type=whole_number(1), default=None,
                        help="ranks to start on each node (default: tp*pp*dp of the recipe; dp unset: every visible "
                             "GPU, or dp 1 on CPU ranks; with --hostfile: each host's slots)")
    parser.add_argument("--hostfile", default=None, help="several nodes: DeepSpeed's hostfile, 'HOST slots=N' a line")
    parser.add_argument("--node-rank", type=whole_number(0), default=None,
                        help="with --hostfile: start only this node's ranks, here, without ssh (run once per node)")
    parser.add_argument("--master-addr", default=None, help="with --hostfile: the address of the first host")
    parser.add_argument("--master-port", type=whole_number(1), default=None,
                        help="the rendezvous port (default: a free one; give the same on every node with --node-rank)")
    parser.add_argument("--verbose", action="store_true",
                        help="keep DeepSpeed's INFO logs on the ranks (MOE_VERBOSE=1); default: a quiet console")


def launch_shape(recipe: Recipe, args: argparse.Namespace, accelerator: str) -> tuple[int, int, list[str]]:
    """(ranks per node, world size, the launcher's resource words)."""
    from ..train.cluster import hostfile_slots, local_resources, visible_devices

    p = recipe.parallel
    if args.hostfile is None:
        if args.node_rank is not None or args.master_addr is not None:
            raise UsageError("--node-rank and --master-addr go with --hostfile; add --hostfile H or drop them")
        if args.num_gpus:
            ranks = args.num_gpus
        elif p.dp is not None or accelerator == "cpu":
            ranks = p.tp * p.pp * (p.dp or 1)
        else:  # dp left to the launch: every GPU this node lets the run see
            from deepspeed.accelerator import get_accelerator

            ranks = len(visible_devices() or []) or get_accelerator().device_count()
        return ranks, ranks, local_resources(ranks, accelerator)
    slots = hostfile_slots(args.hostfile)
    per_node = {host: min(n, args.num_gpus) if args.num_gpus else n for host, n in slots.items()}
    if args.node_rank is not None and args.node_rank >= len(per_node):
        raise UsageError(f"--node-rank {args.node_rank}: {args.hostfile} names {len(per_node)} node(s); choose from "
                         f"0..{len(per_node) - 1}")
    words = ["--hostfile", args.hostfile]
    if args.num_gpus:
        words += ["--num_gpus", str(args.num_gpus)]
    if args.master_addr:
        words += ["--master_addr", args.master_addr]
    if args.node_rank is not None:
        words += ["--no_ssh", "--node_rank", str(args.node_rank)]
    here = list(per_node.values())[args.node_rank or 0]
    return here, sum(per_node.values()), words


def _resumable(recipe: Recipe) -> bool:
    """Whether the run would resume from a checkpoint of its own (`checkpoint.newest`: complete, its contents the
    ranks' to check), so that `train.init_from` is not read."""
    from ..train import checkpoint

    if recipe.train.resume not in ("auto", "never"):  # a checkpoint PATH
        return True
    return recipe.train.resume == "auto" and checkpoint.newest(recipe.output_dir / "checkpoints") is not None


def cmd_train(recipe: Recipe, args: argparse.Namespace) -> int:
    from ..estimate import launch_refusal
    from ..train.main import check_output_dir, check_trainable

    check_trainable(recipe)
    if recipe.train.init_from and not _resumable(recipe):  # what a fresh run's ranks would read, checked here
        from ..train.engine import init_from_source

        left_out = init_from_source(recipe).left_out_line()  # its multi-token-prediction layers
        if left_out:
            print(left_out, file=sys.stderr)
    from ..train.distributed import launch_env
    from ..train.host_memory import cpu_host_refusal

    env = launch_env()
    ranks, world, resources = launch_shape(recipe, args, env["DS_ACCELERATOR"])
    from ..train.device import this_device

    card = this_device(env["DS_ACCELERATOR"])  # the smallest card this node shows; the ranks judge their own again
    refusal = launch_refusal(recipe, world if (args.num_gpus or args.hostfile or recipe.parallel.dp is None) else None,
                             card_bytes=card.memory_bytes, card_name=card.name)
    # every rank of this launch on this host: on CPU they share its memory
    refusal = refusal or cpu_host_refusal(recipe, world, ranks, env["DS_ACCELERATOR"])
    if refusal:
        print(refusal, file=sys.stderr)
        return 1
    created = check_output_dir(recipe)  # once every check before it passed: a refused launch leaves no folder
    from ..train.ownership import OutputLock

    if not args.node_rank:  # node 0 (or the only one) looks; another node's look would race node 0's rank 0
        lock = OutputLock(recipe.output_dir)  # a look before any rank starts; rank 0 of the run takes it for real
        busy = lock.acquire()
        lock.release()
        if busy:
            raise UsageError(busy)
    code = launch(recipe, args, ranks, resources, env)
    if code != 0 and created:  # refused on the ranks before they wrote anything: the folder goes too
        from ..train.ownership import remove_if_unused

        remove_if_unused(recipe.output_dir)
    return code


def launch(recipe: Recipe, args: argparse.Namespace, ranks: int, resources: list[str], env: dict[str, str]) -> int:
    """Start the deepspeed launcher on `moe_model.train.main` and wait for it; its exit code."""
    from ..launch import deepspeed_command, rank_env
    from ..train.cluster import LAUNCH_COMMAND_ENV, launch_words, write_deepspeed_env
    from ..train.console import launcher_log_args

    verbose = getattr(args, "verbose", False)
    ranks_env = rank_env(verbose=verbose, **env, **{LAUNCH_COMMAND_ENV: launch_words(sys.argv)})
    if args.hostfile is not None and args.node_rank is None:  # pdsh: the other nodes get only what the file lists
        ranks_env["DS_ENV_FILE"] = write_deepspeed_env(recipe.output_dir, ranks_env)
    command = deepspeed_command(ranks, "moe_model.train.main", ["--recipe", args.recipe], module=True,
                                overrides=args.set, launcher_args=launcher_log_args(verbose), resources=resources,
                                master_port=args.master_port)
    if not args.json:
        print("+ " + " ".join(command), file=sys.stderr)
    from ..train.main import checkpoint_saved_since, run_launcher

    # Ctrl-C: one line, 130; SIGTERM/SIGUSR1: a checkpoint after the step, 75
    return run_launcher(command, ranks_env, subprocess.call,
                        saved_since=lambda since: checkpoint_saved_since(recipe.output_dir, since))
