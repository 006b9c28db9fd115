"""Run by tests through the deepspeed launcher: the parallel model's logits against the single-device model's.

Every rank builds `MoEForCausalLM` from the recipe's seed (the reference), then the layout's engine from the same
seed, runs one batch in eval mode and writes `OUT/rank<r>.json` with the largest absolute logit difference on the
ranks that hold logits (the last pipeline stage). With tp > 1 and ep > 1 it also checks the gloo token-gather shim
against torch's own all_gather.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moe_model.launch import rank_program_parser
from moe_model.parallel import Layout
from moe_model.parallel.state_dict_adapter import seeded_model
from moe_model.recipe import load_recipe
from moe_model.strategy import Strategy
from moe_model.train.engine import build_engine
from moe_model.train.distributed import close_distributed, init_distributed


def main() -> int:
    parser = rank_program_parser(recipe=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-steps", type=int, default=0,
                        help="train this many steps, save a checkpoint into --run-dir and keep the engine's logits")
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.set)
    rank, world = init_distributed()
    p = recipe.parallel
    layout = Layout.of(Strategy.from_recipe(recipe, world)[0])

    reference = seeded_model(recipe.moe_config(), recipe.train.seed).eval()  # what every layout's shares add up to
    engine, step, _ = build_engine(recipe, layout)
    data_rank = layout.coords(rank)["data"]
    if args.train_steps:
        train_and_save(recipe, layout, engine, step, args.train_steps, Path(args.run_dir))
    engine.eval()

    g = torch.Generator().manual_seed(100 + data_rank)
    ids = torch.randint(0, recipe.model.vocab_size, (p.micro_batch_size, recipe.train.seq_len), generator=g)
    with torch.no_grad():
        expected = reference(ids, use_cache=False).logits
        if layout.pp > 1:
            accumulation = recipe.train.global_batch_size // (p.micro_batch_size * layout.dp)
            _, outputs = engine.eval_batch(iter([(ids, ids)] * accumulation), return_logits=True)
            logits = outputs[0] if engine.is_last_stage() else None  # the last stage returns (logits, carry)
        else:
            logits = engine(input_ids=ids, use_cache=False).logits
    result = {"rank": rank, "holds_logits": logits is not None, "threads": torch.get_num_threads()}
    if logits is not None and args.train_steps:  # the trained engine's logits, for the exported model to match
        torch.save({"ids": ids, "logits": logits.float()}, Path(args.out, f"engine_logits_rank{rank}.pt"))
    elif logits is not None:
        result["max_abs_diff"] = (logits.float() - expected).abs().max().item()
        result["max_abs_logit"] = expected.abs().max().item()
    if layout.tp > 1 and layout.ep > 1:
        result["gather_shim_max_abs_diff"] = check_gather_shim(layout)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    close_distributed()  # a gloo group left to the interpreter's exit can abort it (std::terminate, exit -6)
    return 0


def train_and_save(recipe, layout, engine, step, steps, run_dir: Path) -> None:
    from moe_model.train import checkpoint
    from moe_model.train.data import StepBatches

    batches = StepBatches(recipe, layout.dp, layout.coords(dist.get_rank())["data"])
    for s in range(steps):
        step(batches.micro_batches(s))
    sizes = {"tp": layout.tp, "pp": layout.pp, "ep": layout.ep, "dp": layout.dp, "moe_backend": layout.moe_backend}
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps({"recipe": recipe.model_dump(), "layout": sizes}))
    checkpoint.save(engine, run_dir / "checkpoints", steps, sizes, keep=1)


def check_gather_shim(layout: Layout) -> float:
    from deepspeed.utils import groups

    from moe_model.parallel.moe_layer import _gather_tokens_flat

    group = groups.mpu.get_slice_parallel_group()
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) + 100 * dist.get_rank()
    parts = [torch.empty_like(x) for _ in range(layout.tp)]
    dist.all_gather(parts, x, group=group)
    return (_gather_tokens_flat(x, dim=1) - torch.cat(parts, dim=1)).abs().max().item()


if __name__ == "__main__":
    sys.exit(main())
