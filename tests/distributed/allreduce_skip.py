"""Rank program (1 rank): the engine at ZeRO-0 with DeepSpeed's gradient all-reduce skipped (what `build_engine`
does for one data-parallel rank) against the same engine with it on. Writes both runs' losses and final weights'
largest difference to --out as JSON.

    deepspeed --num_gpus 1 tests/distributed/allreduce_skip.py --recipe R --out F.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe_model.launch import rank_program_parser  # noqa: E402
from moe_model.parallel import Layout  # noqa: E402
from moe_model.recipe import load_recipe  # noqa: E402
from moe_model.train.distributed import close_distributed, init_distributed  # noqa: E402
from moe_model.train.engine import build_engine  # noqa: E402


def main() -> int:
    parser = rank_program_parser(recipe=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.set)
    init_distributed()
    layout = Layout(tp=1, pp=1, ep=1, dp=1)
    runs = {}
    for allreduce in (False, True):
        engine, step, _ = build_engine(recipe, layout)
        assert engine.enable_backward_allreduce is False, "build_engine should skip the all-reduce on one rank"
        engine.enable_backward_allreduce = allreduce
        generator = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(3):
            batch = [torch.randint(0, recipe.model.vocab_size, (recipe.parallel.micro_batch_size, recipe.train.seq_len),
                                   generator=generator) for _ in range(2)]  # 2 micro-batches: accumulation too
            losses.append(float(step(batch).loss))
        runs[allreduce] = (losses, [p.detach().clone() for p in engine.module.parameters()])
    weight_diff = max((a - b).abs().max().item() for a, b in zip(runs[False][1], runs[True][1]))
    Path(args.out).write_text(json.dumps({"losses_skipped": runs[False][0], "losses_allreduce": runs[True][0],
                                          "max_weight_diff": weight_diff}))
    close_distributed()  # a gloo group left to the interpreter's exit can abort it (std::terminate, exit -6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
