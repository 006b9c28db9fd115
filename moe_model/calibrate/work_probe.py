"""One rank's arithmetic as training runs it, timed at the recipe's widths and at shrunken ones (`moe calibrate`).

The work is the busiest pipeline stage's decoder layers, the embedding and the LM head for one micro-batch, forward
and backward, built by the project's `parallel.build_model` (no engine, no optimizer):
- ep = 1 (or tp > 1): in this process, a one-device model with tp's share of the heads and the rank's E/ep experts;
- ep > 1: as a rank program on ep ranks, each with the recipe's MoE backend over the whole expert group, the way a
  stage's ranks run it (`deepspeed --num_gpus EP -m moe_model.calibrate.work_probe --recipe R --out F.json`;
  OMP_NUM_THREADS set by the caller to the share a rank of the full layout gets): DeepSpeed's legacy MoE layer, or
  where the recipe resolves to AutoEP (`Strategy.with_backend`) the project's `AutoEPBlock` converted by
  `deepspeed.initialize` with the DeepSpeed config training writes (`train.ds_config`, its `expert_parallel`
  section), as `train.engine.build_engine` does: AutoEP's router, variable-split all-to-all and grouped GEMMs.
  A recipe stating AutoEP at ep = 1 is timed on the model's own block (one device; the same routed rows without
  AutoEP's 8-row rounding).
The difference between the two widths is the part of the work that grows with the model; its routing skew (busiest
expert's load over the mean, as the layer routed the random tokens) comes with it.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from ..estimate.perf import stage_shape
from ..launch import rank_program_parser
from ..recipe import Recipe, load_recipe, recipe_from_dict
from .timing import median_seconds

REPEATS = 15


def stage_layers_timed(recipe: Recipe) -> int:
    """Decoder layers of the recipe's busiest pipeline stage (the one whose work sets the step time)."""
    first, last, middle = stage_shape(recipe.model.num_hidden_layers, recipe.parallel.pp)
    return recipe.model.num_hidden_layers if recipe.parallel.pp == 1 else max(first, last, middle)


def rank_model_recipe(recipe: Recipe, expert_parallel: bool = False) -> Recipe:
    """One rank's work as a recipe of its own: the busiest stage's layers and tp's share of the heads; its E/ep experts
    on one device (they receive the rank's k*T routed rows in all, as DeepSpeed's dispatch gives them) or, with
    `expert_parallel`, all E experts over ep ranks (dp = ep)."""
    from ..strategy import Strategy

    p, m = recipe.parallel, recipe.model
    ep = p.ep if expert_parallel else 1
    backend = Strategy.from_recipe(recipe)[0].moe_backend if ep > 1 else "legacy"
    experts = m.num_local_experts if expert_parallel else m.num_local_experts // p.ep
    raw = recipe.model_dump()
    raw["model"].update(num_hidden_layers=stage_layers_timed(recipe), num_local_experts=experts,
                        num_experts_per_tok=min(m.num_experts_per_tok, experts),
                        num_attention_heads=m.num_attention_heads // p.tp, head_dim=recipe.moe_config().head_dim,
                        num_key_value_heads=max(1, m.num_key_value_heads // p.tp))
    raw["parallel"] = {"tp": 1, "pp": 1, "ep": ep, "dp": ep, "zero_stage": 0, "micro_batch_size": p.micro_batch_size,
                       "activation_checkpointing": p.activation_checkpointing, "moe_backend": backend}
    raw["train"].update(global_batch_size=p.micro_batch_size * ep, resume="never")
    raw["data"] = {"source": "synthetic"}
    raw["tracking"] = {"wandb": {"mode": "disabled"}}
    raw.pop("claims", None)
    return recipe_from_dict(raw)


def shrunken_widths(recipe: Recipe) -> Recipe:
    """The same recipe with heads of width 2, a hidden width of 2 per head (at least 8) and an expert FFN of 8*tp:
    nothing left that grows with the model. 8: AutoEP's grouped GEMM (`torch._grouped_mm`) needs rows of a
    multiple of 16 bytes, 8 elements in bf16."""
    raw = recipe.model_dump()
    m = raw["model"]
    m.update(head_dim=2, hidden_size=max(8, 2 * m["num_attention_heads"]), intermediate_size=8 * recipe.parallel.tp)
    return recipe_from_dict(raw)


def autoep_converted(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """`model` (with `AutoEPBlock`s) after `deepspeed.initialize` swapped their blocks for AutoEP's layers, under the
    DeepSpeed config training writes for `recipe` (`train.ds_config`); the engine's module, timed without the engine
    (no gradient reduction or optimizer step: those are the step's other terms)."""
    import deepspeed

    from ..train.ds_config import deepspeed_config
    from ..train.engine import defer_muon_compile

    defer_muon_compile()
    engine = deepspeed.initialize(model=model, config=deepspeed_config(recipe))[0]
    converted = [type(m).__name__ for m in engine.module.modules() if type(m).__name__ == "AutoEPMoELayer"]
    if len(converted) != recipe.model.num_hidden_layers:
        raise RuntimeError(f"deepspeed.initialize converted {len(converted)} of {recipe.model.num_hidden_layers} "
                           "MoE blocks to AutoEP")
    return engine.module


def time_work(recipe: Recipe, data_rank: int = 0) -> tuple[float, float]:
    """(median seconds of a micro-batch's forward + backward, routing skew) of `recipe`'s model on its layout."""
    from ..modeling import MoEForCausalLM
    from ..parallel import Layout, build_model

    from ..strategy import Strategy

    p = recipe.parallel
    torch.manual_seed(recipe.train.seed)
    layout = Layout.of(Strategy.from_recipe(recipe)[0])
    model = build_model(MoEForCausalLM(recipe.moe_config()), layout, p.activation_checkpointing).module
    if layout.moe_backend == "autoep":
        model = autoep_converted(model, recipe)
    elif p.ep > 1:
        from deepspeed.moe.layer import MoE

        for module in model.modules():
            if isinstance(module, MoE):
                module.set_deepspeed_parallelism()  # what DeepSpeed's engine does: expert groups, the all-to-all's
    generator = torch.Generator().manual_seed(data_rank)
    ids = torch.randint(0, recipe.model.vocab_size, (p.micro_batch_size, recipe.train.seq_len), generator=generator)
    skews: list[float] = []

    def step() -> None:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        for load in out.expert_counts_LE.float():
            skews.append(float(load.max() / load.mean()))

    seconds = median_seconds(step, REPEATS)
    return seconds, statistics.mean(skews)


def main() -> int:
    parser = rank_program_parser(recipe=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import torch.distributed as dist

    from ..train.distributed import init_distributed

    rank, world = init_distributed()
    work = rank_model_recipe(load_recipe(args.recipe, args.set), expert_parallel=True)
    if work.parallel.ep != world:
        raise SystemExit(f"run this probe on ep = {work.parallel.ep} ranks, not {world}")
    full, skew = time_work(work, rank)
    small, _ = time_work(shrunken_widths(work), rank)
    figures = torch.tensor([full, small, skew], dtype=torch.float64)
    dist.all_reduce(figures, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    if rank == 0:
        Path(args.out).write_text(json.dumps(dict(zip(("full_s", "shrunken_s", "routing_imbalance"),
                                                      figures.tolist()))))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
