"""Run by tests through the deepspeed launcher: the AutoEP block keeps `MoESparseBlock`'s forward contract.

Every rank builds `MoEForCausalLM` from the recipe's seed (the reference, the model's own block), then the recipe's
engine on the AutoEP backend (experts over ep = world size), and runs two forwards of its own batch through both
(no_grad for the reference, training mode for the engine). It writes `OUT/rank<r>.json`: the largest differences of
logits, aux loss, z-loss and the per-forward expert counts, for each of the two forwards (the counts of the second
must not include the first), and whether any module kept a tensor attribute it did not have before the forwards.
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
from moe_model.train.distributed import close_distributed, init_distributed
from moe_model.train.engine import build_engine


def tensor_attributes(module: torch.nn.Module) -> set[str]:
    return {f"{name}.{attr}" for name, m in module.named_modules() for attr, value in vars(m).items()
            if isinstance(value, torch.Tensor)}


def main() -> int:
    parser = rank_program_parser(recipe=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.set)
    rank, world = init_distributed()
    layout = Layout.of(Strategy.from_recipe(recipe, world)[0])
    reference = seeded_model(recipe.moe_config(), recipe.train.seed).eval()  # what every layout's shares add up to
    engine, _, _ = build_engine(recipe, layout)
    before = tensor_attributes(engine.module)
    report = {"rank": rank, "backend": layout.moe_backend, "forwards": []}
    for forward in range(2):
        g = torch.Generator().manual_seed(1000 * forward + rank)
        ids = torch.randint(0, recipe.model.vocab_size, (recipe.parallel.micro_batch_size, recipe.train.seq_len),
                            generator=g)
        with torch.no_grad():
            expected = reference(ids, use_cache=False)
        got = engine(input_ids=ids, use_cache=False)
        report["forwards"].append({
            "logits": (got.logits.float() - expected.logits).abs().max().item(),
            "aux_loss": abs(got.aux_loss.item() - expected.aux_loss.item()) / expected.aux_loss.item(),
            "z_loss": abs(got.z_loss.item() - expected.z_loss.item()) / expected.z_loss.item(),
            "counts_equal": torch.equal(got.expert_counts_LE.cpu(), expected.expert_counts_LE),
            "routes": int(got.expert_counts_LE.sum()),
        })
        got.loss.backward() if got.loss is not None else (got.logits.float().mean() + got.aux_loss).backward()
    report["new_tensor_attributes"] = sorted(tensor_attributes(engine.module) - before)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    close_distributed()  # a gloo group left to the interpreter's exit can abort it (std::terminate, exit -6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
