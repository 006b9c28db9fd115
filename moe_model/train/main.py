"""The training entry the deepspeed launcher runs on every rank (`scripts/train.py` and `moe train` both land here).

    deepspeed --num_gpus N scripts/train.py --recipe R [--set k=v ...]

The same command runs on GPUs (NCCL) and on CPU ranks (gloo): DeepSpeed picks its accelerator by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

from ..recipe import Recipe, RecipeError, layout_problem, load_recipe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a recipe under DeepSpeed (run through the deepspeed launcher)")
    parser.add_argument("--recipe", required=True, help="path of the YAML recipe")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    parser.add_argument("--local_rank", type=int, default=-1, help="passed by the deepspeed launcher")
    return parser.parse_args(argv)


def check_trainable(recipe: Recipe) -> None:
    """Refuse what this version's training loop cannot run, before any process group exists."""
    p = recipe.parallel
    if (p.tp, p.pp, p.ep) != (1, 1, 1):
        raise RecipeError("parallel", (f"tp={p.tp}, pp={p.pp}, ep={p.ep}: only data parallelism trains in this "
                                       "version; use --set parallel.tp=1 --set parallel.pp=1 --set parallel.ep=1"))
    if recipe.data.source != "synthetic":
        raise RecipeError("data.source", f"{recipe.data.source!r} is not wired into training yet; use synthetic")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.set)
        check_trainable(recipe)
        recipe.output_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(recipe.output_dir, os.W_OK):
            raise RecipeError("train.output_dir", f"{str(recipe.output_dir)!r} is not writable; choose another")
    except RecipeError as err:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"moe: recipe error: {err}", file=sys.stderr)
        return 2
    return train(recipe)


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; norms' gains are left alone."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(recipe: Recipe) -> int:
    import deepspeed
    import torch.distributed as dist

    from .. import MoEForCausalLM
    from .data import StepBatches
    from .ds_config import deepspeed_config
    from .tracking import Tracker

    deepspeed.init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    p = recipe.parallel
    dp = world // (p.tp * p.pp)
    problem = layout_problem(recipe.model, p.tp, p.pp, p.ep, dp, p.zero_stage, recipe.hardware.gpus_per_node)
    if problem is None and recipe.train.global_batch_size % (p.micro_batch_size * dp):
        problem = ("train.global_batch_size", f"{recipe.train.global_batch_size} is not a multiple of "
                   f"micro_batch_size x dp = {p.micro_batch_size} x {dp}")
    if problem:
        if rank == 0:
            print(f"moe: recipe error: {RecipeError(*problem)} (world size {world})", file=sys.stderr)
        return 2

    torch.manual_seed(recipe.train.seed)
    config = recipe.moe_config()
    model = MoEForCausalLM(config)
    if p.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ds_config = deepspeed_config(recipe)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=weight_decay_groups(model, recipe.train.weight_decay), config=ds_config)

    layout = {"tp": p.tp, "pp": p.pp, "ep": p.ep, "dp": dp, "world_size": world}
    run_config = {"recipe": recipe.model_dump(), "deepspeed": ds_config, "layout": layout}
    if rank == 0:
        (recipe.output_dir / "run.json").write_text(json.dumps(run_config, indent=2))
    tracker = Tracker(recipe, run_config, enabled=rank == 0)
    batches = StepBatches(recipe, dp, dist.get_rank() // (p.tp * p.pp))
    moe_blocks = [layer.mlp for layer in engine.module.model.layers]
    tokens_per_step = recipe.train.global_batch_size * recipe.train.seq_len

    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=recipe.train.steps, desc=recipe.name, unit="step", dynamic_ncols=True)
    history = []
    started = time.perf_counter()
    for step in range(recipe.train.steps):
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]
        losses = torch.zeros(3)
        load_LE = torch.zeros(len(moe_blocks), config.num_local_experts)
        for ids in batches.micro_batches(step):
            ids = ids.to(engine.device)
            out = engine(input_ids=ids, labels=ids, use_cache=False)
            engine.backward(out.loss)
            engine.step()
            losses += torch.stack([out.loss.detach(), out.lm_loss.detach(), out.aux_loss.detach()]).float().cpu()
            load_LE += torch.stack([b.tokens_per_expert.float().cpu() for b in moe_blocks])
        dist.all_reduce(losses)
        dist.all_reduce(load_LE)
        losses /= batches.accumulation * dp
        step_time = time.perf_counter() - t0
        metrics = step_metrics(step + 1, losses, lr, engine.get_global_grad_norm(), step_time, tokens_per_step, load_LE)
        history.append(metrics)
        if (step + 1) % recipe.train.log_every == 0 or step + 1 == recipe.train.steps:
            tracker.log(metrics)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
    if progress is not None:
        progress.close()
        print_summary(recipe, history, time.perf_counter() - started, layout)
    tracker.finish()
    dist.barrier()
    return 0


def step_metrics(step, losses, lr, grad_norm, step_time, tokens_per_step, load_LE) -> dict[str, Any]:
    """One line of metrics.jsonl. Expert load: routes each expert got in this step, over all ranks and micro-batches."""
    max_over_mean_L = load_LE.max(dim=1).values / load_LE.mean(dim=1)
    return {
        "step": step,
        "loss": losses[0].item(),
        "lm_loss": losses[1].item(),
        "aux_loss": losses[2].item(),
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "tokens_per_s": tokens_per_step / step_time,
        "step_time_s": step_time,
        "expert_load_max_over_mean": max_over_mean_L.max().item(),
        "expert_load_max_over_mean_per_layer": [round(v, 4) for v in max_over_mean_L.tolist()],
        "experts_without_tokens": int((load_LE == 0).sum().item()),
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
        table.add_row(key, f"{first[key]:.4f}", f"{last[key]:.4f}")
    console = Console()
    console.print(table)
    drop = 100 * (1 - last["loss"] / first["loss"])
    console.print(f"loss fell {drop:.1f}% in {wall_s:.1f} s; metrics: {recipe.output_dir / 'metrics.jsonl'}")


if __name__ == "__main__":
    sys.exit(main())
