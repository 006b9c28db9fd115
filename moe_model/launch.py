"""The one builder of a deepspeed launcher command line, and the environment its ranks get.

    deepspeed --num_gpus N --master_port P (--module M | SCRIPT) ARGS...

Used by `moe train`, `moe calibrate`'s rank programs, the multi-rank tests and the benchmarks. Every launch takes a
free port of its own (never a fixed one), so that launches can run side by side on one machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import LaunchError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher() -> str:
    """Path of the `deepspeed` launcher: the one beside this Python (the project's venv) first, then PATH."""
    found = shutil.which("deepspeed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if found is None:
        raise LaunchError("the deepspeed launcher is not on PATH; install the project (make install)")
    return found


def deepspeed_command(ranks: int, program: str | Path, args: Sequence[str] = (), *, module: bool = False,
                      overrides: Sequence[str] = (), master_port: int | None = None,
                      launcher_args: Sequence[str] = (), resources: Sequence[str] | None = None) -> list[str]:
    """`deepspeed --num_gpus RANKS --master_port P [LAUNCHER_ARGS]` then `--module PROGRAM` (module=True) or the
    script PROGRAM, then `args` and one `--set O` per override. P: a free port unless given. `resources` replaces
    `--num_gpus RANKS` (e.g. `--include localhost:2,3`, or `--hostfile H ...`: `train.cluster`)."""
    where = list(resources) if resources is not None else ["--num_gpus", str(ranks)]
    command = [deepspeed_launcher(), *where, "--master_port", str(master_port or free_port()), *launcher_args]
    command += ["--module", str(program)] if module else [str(program)]
    command += [str(a) for a in args]
    for override in overrides:
        command += ["--set", override]
    return command


def rank_program_parser(description: str | None = None, recipe: bool = False) -> argparse.ArgumentParser:
    """The argument parser of a program `deepspeed_command` starts: `--local_rank` (the launcher passes it; the
    programs read LOCAL_RANK), and with `recipe` the recipe path and its `--set` overrides."""
    parser = argparse.ArgumentParser(description=description)
    if recipe:
        parser.add_argument("--recipe", required=True, help="path of the YAML recipe")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


def rank_env(verbose: bool = False, threads: int | None = None, base: Mapping[str, str] | None = None,
             **extra: str) -> dict[str, str]:
    """The environment of a launch: `base` (default: this process's), MOE_VERBOSE=1 when `verbose` (the ranks then
    keep DeepSpeed's INFO logs; unset, they stay quiet unless the caller's environment already says 1),
    OMP_NUM_THREADS=`threads` when given, and `extra` (e.g. WANDB_MODE="disabled")."""
    env = dict(os.environ if base is None else base)
    if verbose:
        env["MOE_VERBOSE"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra)
    return env
