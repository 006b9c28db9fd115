"""The training entry the deepspeed launcher runs on every rank (`scripts/train.py` and `moe train` both land here).

    deepspeed --num_gpus N scripts/train.py --recipe R [--set k=v ...]

The same command runs on GPUs (NCCL) and on CPU ranks (gloo): DeepSpeed picks its accelerator by itself. The run
itself is `trainer.Trainer`; what the console shows (and `MOE_VERBOSE=1`, which keeps DeepSpeed's logs) is `console`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from ..launch import rank_program_parser
from ..recipe import Recipe, RecipeError, load_recipe
from ..strategy import Strategy
from .console import library_output, quiet_libraries
from .distributed import init_distributed, stale_build_lock


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = rank_program_parser("Train a recipe under DeepSpeed (run through the deepspeed launcher)", recipe=True)
    return parser.parse_args(argv)


def check_trainable(recipe: Recipe) -> None:
    """Refuse what DeepSpeed accepts but this project cannot yet train correctly, before any process group exists."""
    problem = Strategy.of(recipe.parallel).training_problem()
    if problem:
        raise RecipeError(*problem)


def check_output_dir(recipe: Recipe) -> None:
    """The output folder must be creatable, writable and roomy enough for the checkpoints, before any step."""
    try:
        recipe.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RecipeError("train.output_dir", f"cannot create {str(recipe.output_dir)!r} ({err.strerror}); "
                                              "choose another") from None
    if not os.access(recipe.output_dir, os.W_OK):
        raise RecipeError("train.output_dir", f"{str(recipe.output_dir)!r} is not writable; choose another")
    check_disk_space(recipe)


def check_disk_space(recipe: Recipe) -> None:
    """Checkpoints must fit before the first step: about 18 bytes a parameter each (16-bit or fp32 weights, fp32
    master and Adam moments), for the kept ones plus the one being written."""
    if not recipe.train.save_every:
        return
    from ..estimate.params import count_params

    per_checkpoint = 18 * count_params(recipe.moe_config()).total
    needed = per_checkpoint * (recipe.train.keep_checkpoints + 1 if recipe.train.keep_checkpoints else 2)
    free = shutil.disk_usage(recipe.output_dir).free
    if free < needed:
        raise RecipeError("train.output_dir", (f"{free / 1e9:.1f} GB free under {recipe.output_dir}, checkpoints need "
                                               f"about {needed / 1e9:.1f} GB; free space, lower "
                                               "train.keep_checkpoints or choose another output_dir"))


def main(argv: list[str] | None = None) -> int:
    """Check the recipe, its output folder and the build cache, start the process group, check the layout against
    the world size, then train. The one place a stopped run becomes its line (on global rank 0) and its exit code."""
    args = parse_args(argv)
    quiet_libraries()
    from .trainer import RunStopped, Trainer, recipe_error  # here: `moe train` imports this module's checks only

    try:
        try:
            recipe = load_recipe(args.recipe, args.set)
            check_trainable(recipe)
            check_output_dir(recipe)
        except RecipeError as err:
            raise recipe_error(err) from None
        check_build_lock()
        with library_output():
            rank, world = init_distributed()
        problem = launch_problem(recipe, world)
        if problem:
            raise recipe_error(RecipeError(*problem), f" (world size {world})")
        return Trainer(recipe, rank, world).run()
    except RunStopped as stop:
        if global_rank() == 0:
            print(stop.line, file=sys.stderr)
        return stop.code


def global_rank() -> int:
    """This process's rank: the process group's once it exists, before that the launcher's RANK."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def check_build_lock() -> None:
    """Stop (exit 2) instead of waiting forever on a build lock a killed run left (`distributed.stale_build_lock`)."""
    from .trainer import RunStopped

    lock = stale_build_lock()
    if lock is not None:
        raise RunStopped(2, f"moe: error: {lock} is a build lock left by a killed run (no build is running); every "
                            f"run would wait on it forever: rm {lock}")


def launch_problem(recipe: Recipe, world: int) -> tuple[str, str] | None:
    """`Strategy`'s rules again, now that the world size (and so dp) is known, and whether this accelerator runs the
    recipe's precision."""
    stated = Strategy.of(recipe.parallel)
    problem = stated.world_problem(world)
    if problem is None:
        problem = stated.resolved(world)[0].problem(recipe.model, recipe.hardware.gpus_per_node,
                                                    recipe.train.global_batch_size, trainable=True)
    if problem is None and recipe.train.precision != "fp32":
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        supported = accelerator.is_fp16_supported() if recipe.train.precision == "fp16" else accelerator.is_bf16_supported()
        if not supported:
            problem = ("train.precision", f"{recipe.train.precision} is not supported by DeepSpeed's "
                       f"{accelerator.device_name()} accelerator here; use fp32 (or bf16)")
    return problem


if __name__ == "__main__":
    sys.exit(main())
