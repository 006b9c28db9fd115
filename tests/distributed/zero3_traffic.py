"""Run by tests through the deepspeed launcher: what a live ZeRO-3 engine all-gathers per micro-batch.

Builds the recipe's engine (`train.engine.build_engine`, ZeRO-3) with `stage3_param_persistence_threshold`,
`stage3_max_reuse_distance`, `stage3_prefetch_bucket_size` and `stage3_max_live_parameters` set from the command
line, counts the elements of every parameter DeepSpeed's
`PartitionedParameterCoordinator` all-gathers (those not already available), split into forward and backward and
into dense and expert parameters, over the last of three micro-batches (the first records the module trace), and the
elements of the parameters it keeps whole (`ds_persist`). Rank 0 writes OUT/zero3.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moe_model.launch import rank_program_parser
from moe_model.parallel import Layout
from moe_model.recipe import load_recipe
from moe_model.strategy import Strategy
from moe_model.train import engine as engine_module
from moe_model.train.distributed import close_distributed, init_distributed


def main() -> int:
    parser = rank_program_parser(recipe=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--persistence", type=int, required=True)
    parser.add_argument("--reuse", type=int, required=True)
    parser.add_argument("--prefetch", type=int, required=True)
    parser.add_argument("--max-live", type=int, required=True)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.set)
    rank, world = init_distributed()
    layout = Layout.of(Strategy.from_recipe(recipe, world)[0])

    written = engine_module.deepspeed_config

    def with_stage3(r):
        config = written(r)
        config["zero_optimization"].update(stage3_param_persistence_threshold=args.persistence,
                                           stage3_max_reuse_distance=args.reuse,
                                           stage3_prefetch_bucket_size=args.prefetch,
                                           stage3_max_live_parameters=args.max_live)
        return config

    engine_module.deepspeed_config = with_stage3
    engine, _, _ = engine_module.build_engine(recipe, layout)
    names = {id(p): name for name, p in engine.module.named_parameters()}

    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    counts = {}
    gather = PartitionedParameterCoordinator._PartitionedParameterCoordinator__all_gather_params_

    def counting(self, params, forward, quantize=False):
        for p in params:
            if p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                key = f"{'forward' if forward else 'backward'}_{'expert' if '.experts.' in names[id(p)] else 'dense'}"
                counts[key] = counts.get(key, 0) + p.ds_numel
        return gather(self, params, forward, quantize)

    PartitionedParameterCoordinator._PartitionedParameterCoordinator__all_gather_params_ = counting
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        counts.clear()
        ids = torch.randint(0, recipe.model.vocab_size, (recipe.parallel.micro_batch_size, recipe.train.seq_len),
                            generator=g)
        out = engine(input_ids=ids, labels=ids, use_cache=False)
        engine.backward(out.loss)
        engine.step()
    persistent = {"persistent_dense": 0, "persistent_expert": 0}
    for p in engine.module.parameters():
        if getattr(p, "ds_persist", False):
            persistent[f"persistent_{'expert' if '.experts.' in names[id(p)] else 'dense'}"] += p.ds_numel
    kinds = sorted({type(m).__name__ for m in engine.module.modules() if "MoE" in type(m).__name__})
    if rank == 0:
        Path(args.out, "zero3.json").write_text(json.dumps({**counts, **persistent, "modules": kinds,
                                                            "zero_stage": engine.zero_optimization_stage()}))
    dist.barrier()
    close_distributed()  # a gloo group left to the interpreter's exit can abort it (std::terminate, exit -6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
