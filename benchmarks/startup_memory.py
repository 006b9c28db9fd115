"""Host memory of CPU ranks at start-up: every rank building the whole model (before) against the meta-device build
that allocates only the rank's share (after), and the estimator's per-rank figure as a bound.

    .venv/bin/python benchmarks/startup_memory.py --train-steps 0          # 8 ranks, ep 8, ~600 M parameters
    .venv/bin/python benchmarks/startup_memory.py --ranks 2 --layers 2     # small, with two training steps
    .venv/bin/python benchmarks/startup_memory.py --ranks 2 --layers 2 --allocator default   # glibc's own heap

Model: 12 layers, hidden 256, expert FFN 1024 (gated silu), 64 experts top-2, vocab 1024, 4 heads; fp32, ZeRO-1,
dp = ranks, ep = ranks (AutoEP), micro-batch 1 x 128 tokens. Each mode is one launch through the deepspeed
launcher; every rank reports the peak resident set (VmHWM, /proc/self/status):
- baseline: after imports and the process group (the process's fixed cost: Python, torch, DeepSpeed, gloo);
- built: after this rank's share of the model exists (before `deepspeed.initialize`);
- start-up: after the engine exists, before the first step. `before` builds the whole `MoEForCausalLM` on every
  rank and keeps its share (the previous `build_engine`); `after` is `train.engine.rank_share` (meta device, this
  rank's parameters only, read from the recipe's seed);
- training: after `--train-steps` optimizer steps (Adam's moments exist), `after` mode only (0: not run; 8 ranks of
  the full model do not fit this 24 GB host once DeepSpeed's gradient bucket, 5e8 elements, is touched by each).
The table shows the largest rank, its share (parameters it holds x 4 bytes), the whole model's fp32 bytes, and the
estimator's peak rank on CPU (`estimate.guard.host_resident`) plus the baseline: that sum must bound the training
peak. `--allocator heap` (default) runs the ranks as `moe train` does, with `HEAP_ENV` (freed memory kept for reuse,
never returned: its holes add to the peak); `default` with glibc's own settings, whose peak is the live memory's.
JSON: benchmarks/results/startup_memory_<ranks>ranks[_default].json.

Run under the deepspeed launcher with `--measure OUT --mode M`, this file is also the rank-side program.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def recipe_dict(ranks: int, layers: int) -> dict:
    return {
        "name": "startup-memory",
        "model": {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": layers,
                  "num_attention_heads": 4, "num_key_value_heads": 4, "num_local_experts": 64,
                  "num_experts_per_tok": 2, "hidden_act": "silu", "max_position_embeddings": 256},
        "parallel": {"tp": 1, "pp": 1, "ep": ranks, "dp": ranks, "zero_stage": 1, "micro_batch_size": 1},
        "train": {"global_batch_size": ranks, "seq_len": 128, "steps": 10, "warmup_steps": 1, "precision": "fp32",
                  "save_every": 0},
        "data": {"source": "synthetic"},
        "tracking": {"wandb": {"mode": "disabled"}},
    }


def peak_rss() -> int:
    """VmHWM of this process, bytes: the most resident memory it ever had."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(out: Path, mode: str, recipe_path: str, train_steps: int) -> None:
    import torch
    import torch.distributed as dist

    from moe_model import MoEForCausalLM
    from moe_model.parallel import Layout, build_model
    from moe_model.recipe import load_recipe
    from moe_model.strategy import Strategy
    from moe_model.train.data import StepBatches
    from moe_model.train.distributed import close_distributed, init_distributed
    from moe_model.train.engine import build_engine, rank_share

    recipe = load_recipe(recipe_path)
    rank, world = init_distributed()
    layout = Layout.of(Strategy.from_recipe(recipe, world)[0])
    report = {"rank": rank, "baseline": peak_rss()}
    if mode == "before":  # every rank builds the whole model from the seed, then keeps its share
        torch.manual_seed(recipe.train.seed)
        share = build_model(MoEForCausalLM(recipe.moe_config()), layout, recipe.parallel.activation_checkpointing)
    else:
        share = rank_share(recipe, layout)
    report["built"] = peak_rss()
    (out / f"rank{rank}.json").write_text(json.dumps(report))  # kept if the engine's start-up runs out of memory
    engine, step, _ = build_engine(recipe, layout, share=share)
    report["startup"] = peak_rss()
    report["share_bytes"] = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    if mode == "after" and train_steps:
        batches = StepBatches(recipe, layout.dp, layout.coords(rank)["data"])
        for s in range(train_steps):
            step(batches.micro_batches(s))
        report["training"] = peak_rss()
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    close_distributed()  # gloo's threads down before the interpreter exits (see ds_moe_layer.on_rank)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--modes", nargs="+", default=["before", "after"], choices=["before", "after"])
    parser.add_argument("--train-steps", type=int, default=2, help="steps after start-up in `after` mode (0: none)")
    parser.add_argument("--allocator", choices=["heap", "default"], default="heap",
                        help="heap: HEAP_ENV, as moe train runs CPU ranks; default: glibc's own settings")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(Path(args.measure), args.mode, args.recipe, args.train_steps)
        return 0

    import subprocess

    import yaml
    from rich.console import Console
    from rich.table import Table

    from moe_model.estimate.estimate import estimate
    from moe_model.estimate.guard import host_resident
    from moe_model.estimate.params import count_params
    from moe_model.launch import deepspeed_command, rank_env
    from moe_model.recipe import recipe_from_dict
    from moe_model.train.distributed import HEAP_ENV, launch_env

    raw = recipe_dict(args.ranks, args.layers)
    recipe = recipe_from_dict(raw)
    total = count_params(recipe.moe_config()).total
    estimated = estimate(recipe, args.ranks, host_resident(recipe)).peak.total_bytes
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        recipe_path = Path(tmp) / "recipe.yaml"
        recipe_path.write_text(yaml.safe_dump(raw))
        for mode in args.modes:
            out = Path(tmp) / mode
            out.mkdir()
            command = deepspeed_command(args.ranks, Path(__file__),
                                        ["--measure", str(out), "--mode", mode, "--recipe", str(recipe_path),
                                         "--train-steps", str(args.train_steps)])
            env = rank_env(**launch_env())
            if args.allocator == "default":
                env = {k: v for k, v in env.items() if k not in HEAP_ENV}
            result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
            reports = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
            if result.returncode != 0 or len(reports) != args.ranks or any("startup" not in r for r in reports):
                log = ROOT / f"benchmarks/results/startup_memory_{mode}.log"
                log.write_text(result.stdout + result.stderr)
                killed = [line for line in (result.stdout + result.stderr).splitlines() if "return code = -9" in line]
                rows[mode] = {"failed": ("a rank was killed (-9: out of host memory)" if killed
                                         else f"exit {result.returncode}") + f"; log: {log.name}"}
                if len(reports) == args.ranks:  # every rank got as far as its built model
                    rows[mode]["largest_rank"] = max(reports, key=lambda r: r["built"])
                continue
            largest = max(reports, key=lambda r: r["startup"])
            rows[mode] = {"largest_rank": largest, "ranks": reports}
    table = Table(title=(f"{args.ranks} CPU ranks, ep {args.ranks}, {total / 1e6:.0f} M parameters "
                         f"({total * 4 / 1e9:.2f} GB in fp32), largest rank, GB, allocator: {args.allocator}"))
    for column in ("build", "baseline", "model built", "start-up peak", "training peak", "its share (fp32)",
                   "whole model (fp32)", "estimate + baseline"):
        table.add_column(column, justify="right")
    for mode, row in rows.items():
        if "largest_rank" not in row:
            table.add_row(mode, "failed: " + row["failed"], "", "", "", "", "", "")
            continue
        r = row["largest_rank"]
        startup = f"{r['startup'] / 1e9:.2f}" if "startup" in r else "failed: " + row["failed"]
        table.add_row(mode, f"{r['baseline'] / 1e9:.2f}", f"{r['built'] / 1e9:.2f}", startup,
                      f"{r['training'] / 1e9:.2f}" if "training" in r else "-",
                      f"{r['share_bytes'] / 1e9:.2f}" if "share_bytes" in r else "-",
                      f"{total * 4 / 1e9:.2f}", f"{(estimated + r['baseline']) / 1e9:.2f}")
    Console(width=140).print(table)
    result_file = ROOT / "benchmarks/results/startup_memory.json"
    suffix = "" if args.allocator == "heap" else f"_{args.allocator}"
    result_file = result_file.with_name(f"startup_memory_{args.ranks}ranks{suffix}.json")
    result_file.write_text(json.dumps({"ranks": args.ranks, "layers": args.layers, "params": total,
                                       "allocator": args.allocator, "train_steps": args.train_steps,
                                       "estimate_peak_rank_bytes": estimated, "modes": rows}, indent=2))
    print(f"wrote {result_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
