"""The training entry the deepspeed launcher runs on every rank (`scripts/train.py` and `moe train` both land here).

    deepspeed --num_gpus N scripts/train.py --recipe R [--set k=v ...]

The same command runs on GPUs (NCCL) and on CPU ranks (gloo): DeepSpeed picks its accelerator by itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from typing import Any

from ..recipe import Recipe, RecipeError, layout_problem, load_recipe, training_problem
from . import checkpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a recipe under DeepSpeed (run through the deepspeed launcher)")
    parser.add_argument("--recipe", required=True, help="path of the YAML recipe")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    parser.add_argument("--local_rank", type=int, default=-1, help="passed by the deepspeed launcher")
    return parser.parse_args(argv)


def check_trainable(recipe: Recipe) -> None:
    """Refuse what DeepSpeed accepts but this project cannot yet train correctly, before any process group exists."""
    problem = training_problem(recipe.parallel.tp, recipe.parallel.ep)
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
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.set)
        check_trainable(recipe)
        check_output_dir(recipe)
    except RecipeError as err:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"moe: recipe error: {err}", file=sys.stderr)
        return 2
    return train(recipe)


def train(recipe: Recipe) -> int:
    # DeepSpeed 0.19's collectives call torch's all_gather_into_tensor, which torch 2.13 marks deprecated: noise
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    import torch.distributed as dist

    from ..parallel import Layout
    from .data import StepBatches, prepare_data
    from .distributed import init_distributed
    from .engine import build_engine
    from .evaluation import Validation
    from .tracking import Tracker, flops_per_token, memory_peak_gb, run_config_extras, throughput_metrics

    rank, world = init_distributed()
    p = recipe.parallel
    problem = launch_problem(recipe, world)
    if problem:
        if rank == 0:
            print(f"moe: recipe error: {RecipeError(*problem)} (world size {world})", file=sys.stderr)
        return 2
    from ..estimate import launch_refusal

    refusal = launch_refusal(recipe, world)  # the same answer on every rank: the estimate is pure arithmetic
    if refusal:
        if rank == 0:
            print(refusal, file=sys.stderr)
        return 1
    layout = Layout(tp=p.tp, pp=p.pp, ep=p.ep, dp=world // (p.tp * p.pp))
    if layout.dp == 1 and p.zero_stage > 0 and rank == 0:
        print(f"moe: note: ZeRO-{p.zero_stage} partitions over data-parallel ranks and this run has one; it only adds "
              "gradient and weight copies here (a 1-rank step measured 2.3x slower than at ZeRO-0): "
              "--set parallel.zero_stage=0", file=sys.stderr)
    # the tokenizer and token cache are built once (local rank 0) before any engine exists; a bad corpus stops all
    data_problem, data_summary = prepare_data(recipe)
    if data_problem:
        if rank == 0:
            print(f"moe: recipe error: {data_problem}", file=sys.stderr)
        return 2
    layout_sizes = {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "dp": layout.dp}
    checkpoints = recipe.output_dir / "checkpoints"
    try:
        resume_from, notes = checkpoint.find_resume(checkpoints, recipe.train.resume, layout_sizes)
    except RecipeError as err:
        if rank == 0:
            print(f"moe: recipe error: {err}", file=sys.stderr)
        return 2
    engine, run_step, ds_config = build_engine(recipe, layout)
    first_step = 0
    if resume_from is not None:
        first_step = checkpoint.load(engine, resume_from)
        if rank == 0:
            for note in notes:
                print(f"moe: {note}", file=sys.stderr)
            print(f"moe: resuming from {resume_from} (step {first_step})", file=sys.stderr)
            checkpoint.trim_metrics(recipe.output_dir / "metrics.jsonl", first_step)

    run_config = {"recipe": recipe.model_dump(), "deepspeed": ds_config, "layout": {**layout_sizes, "world_size": world}}
    run_config.update(data=data_summary, **run_config_extras(recipe, world))
    if rank == 0:
        (recipe.output_dir / "run.json").write_text(json.dumps(run_config, indent=2))
    tracker = Tracker(recipe, run_config, enabled=rank == 0)
    batches = StepBatches(recipe, layout.dp, layout.coords(rank)["data"])
    validation = Validation(recipe, engine, layout, rank)
    config = recipe.moe_config()
    tokens_per_step = recipe.train.global_batch_size * recipe.train.seq_len
    step_flops = flops_per_token(config, recipe.train.seq_len)["total"]

    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=recipe.train.steps, initial=first_step, desc=recipe.name, unit="step",
                        dynamic_ncols=True)
    history = []
    started = time.perf_counter()
    for step in range(first_step, recipe.train.steps):
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]
        parts = run_step(batches.micro_batches(step))
        parts = parts.to(engine.device)  # NCCL reduces device tensors only
        dist.all_reduce(parts)
        parts = parts.cpu()
        # every tp rank of every data shard that sees the loss holds the same figures: average them out
        losses = parts[:4] / (batches.accumulation * layout.dp * layout.tp)
        load_LE = parts[4:].reshape(config.num_hidden_layers, config.num_local_experts) / layout.tp
        step_time = time.perf_counter() - t0
        metrics = step_metrics(step + 1, losses, lr, engine.get_global_grad_norm(), step_time, tokens_per_step, load_LE)
        metrics.update(throughput_metrics(metrics["tokens_per_s"], step_flops, world, recipe.hardware.peak_tflops))
        if validation.due(step + 1):
            metrics.update(validation.run())
        history.append(metrics)
        if (step + 1) % recipe.train.log_every == 0 or step + 1 == recipe.train.steps or validation.due(step + 1):
            metrics["memory_peak_gb"] = memory_peak_gb()  # a collective: every rank logs the same steps
            tracker.log(metrics)
        if progress is not None:
            progress.update(1)
            shown = {"loss": f"{metrics['loss']:.4f}", "tok_s": f"{metrics['tokens_per_s']:.0f}"}
            if "val_loss" in metrics:
                shown["val"] = f"{metrics['val_loss']:.4f}"
            progress.set_postfix(shown)
        if is_fault(metrics["loss"], engine):
            if rank == 0:
                newest = checkpoint.newest(checkpoints)
                print(f"moe: the loss is {metrics['loss']} at step {step + 1}; stopping. Newest good checkpoint: "
                      f"{newest or 'none'} (lower train.lr or check the data, then resume)", file=sys.stderr)
            return 3
        save_every = recipe.train.save_every
        if save_every and ((step + 1) % save_every == 0 or step + 1 == recipe.train.steps):
            checkpoint.save(engine, checkpoints, step + 1, layout_sizes, recipe.train.keep_checkpoints)
    if progress is not None:
        progress.close()
        if history:
            print_summary(recipe, history, time.perf_counter() - started, run_config["layout"])
    tracker.finish()
    dist.barrier()
    return 0


def is_fault(loss: float, engine) -> bool:
    """A non-finite loss stops the run, except where fp16's dynamic loss scaling skipped that step by itself."""
    if math.isfinite(loss):
        return False
    fp16_skipped = bool(engine.fp16_enabled()) and not engine.was_step_applied()
    return not fp16_skipped


def launch_problem(recipe: Recipe, world: int) -> tuple[str, str] | None:
    """The layout rules again, now that the world size (and so dp) is known."""
    try:
        check_trainable(recipe)
    except RecipeError as err:
        return err.field, err.message
    p = recipe.parallel
    if world % (p.tp * p.pp):
        return "parallel", f"world size {world} is not a multiple of tp x pp = {p.tp} x {p.pp}; start tp*pp*dp ranks"
    dp = world // (p.tp * p.pp)
    if p.dp is not None and p.dp != dp:
        return "parallel.dp", f"the recipe says dp={p.dp} but {world} ranks give dp={dp}; start {p.tp * p.pp * p.dp} ranks"
    problem = layout_problem(recipe.model, p.tp, p.pp, p.ep, dp, p.zero_stage, recipe.hardware.gpus_per_node)
    if problem is None and recipe.train.precision != "fp32":
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        supported = accelerator.is_fp16_supported() if recipe.train.precision == "fp16" else accelerator.is_bf16_supported()
        if not supported:
            problem = ("train.precision", f"{recipe.train.precision} is not supported by DeepSpeed's "
                       f"{accelerator.device_name()} accelerator here; use fp32 (or bf16)")
    if problem is None and recipe.train.global_batch_size % (p.micro_batch_size * dp):
        problem = ("train.global_batch_size", f"{recipe.train.global_batch_size} is not a multiple of "
                   f"micro_batch_size x dp = {p.micro_batch_size} x {dp}")
    return problem


def step_metrics(step, losses, lr, grad_norm, step_time, tokens_per_step, load_LE) -> dict[str, Any]:
    """One line of metrics.jsonl. Expert load: routes each expert got in this step, over all ranks and micro-batches.

    `losses` is [loss, lm_loss, aux_loss, z_loss] averaged over the step's micro-batches.
    """
    max_over_mean_L = load_LE.max(dim=1).values / load_LE.mean(dim=1)
    return {
        "step": step,
        "loss": losses[0].item(),
        "lm_loss": losses[1].item(),
        "aux_loss": losses[2].item(),
        "z_loss": losses[3].item(),
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "tokens_per_s": tokens_per_step / step_time,
        "step_time_s": step_time,
        "expert_load_max_over_mean": max_over_mean_L.max().item(),
        "expert_load_max_over_mean_per_layer": [round(v, 4) for v in max_over_mean_L.tolist()],
        "experts_without_tokens": int((load_LE == 0).sum().item()),
        "expert_tokens_max_per_layer": [round(v) for v in load_LE.max(dim=1).values.tolist()],
        "expert_tokens_mean_per_layer": [round(v, 2) for v in load_LE.mean(dim=1).tolist()],
        "experts_without_tokens_per_layer": [int(v) for v in (load_LE == 0).sum(dim=1).tolist()],
        "expert_tokens": [[round(v) for v in row] for row in load_LE.tolist()],  # layers x experts (routes)
    }


def print_summary(recipe: Recipe, history: list[dict[str, Any]], wall_s: float, layout: dict[str, int]) -> None:
    from rich.console import Console
    from rich.table import Table

    first, last = history[0], history[-1]
    table = Table(title=f"{recipe.name}: {len(history)} steps, {layout['world_size']} rank(s), "
                        f"tp{layout['tp']} pp{layout['pp']} dp{layout['dp']} ep{layout['ep']}")
    for column in ("", "first step", "last step"):
        table.add_column(column, justify="right")
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "tokens_per_s", "expert_load_max_over_mean"):
        table.add_row(key, *(f"{m[key]:.4f}" if m.get(key) is not None else "-" for m in (first, last)))
    console = Console()
    console.print(table)
    drop = 100 * (1 - last["loss"] / first["loss"])
    console.print(f"loss fell {drop:.1f}% in {wall_s:.1f} s; metrics: {recipe.output_dir / 'metrics.jsonl'}")
    evals = [m for m in history if "val_loss" in m]
    if evals:
        console.print("validation loss: " + ", ".join(f"{m['val_loss']:.4f} (step {m['step']})" for m in evals))


if __name__ == "__main__":
    sys.exit(main())
