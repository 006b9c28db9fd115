"""Two of `make gpu-check`'s parts, each run by scripts/gpu_check.py in a process of its own.

    python scripts/gpu_check_parts.py memory-cpu --case N --out F     # the CPU dry run's memory case N
    python scripts/gpu_check_parts.py speed --recipe R --device cuda --dtype bf16 --peak-tflops P --out F

- memory-cpu: benchmarks/memory_accuracy.py's activation case N (the bytes autograd saves for backward in one
  forward, against `activations.model_saved`), alone in this process; the GPU cases are memory_accuracy's own
  `--measure-gpu OUT --case N` under the deepspeed launcher (a process group: `build_engine`).
- speed: the recipe's model against transformers' Mixtral on the same device, same weights (`to_mixtral`), same
  batch (one micro-batch of the recipe: micro_batch_size x seq_len tokens) and the same precision regime (both
  models cast whole to `--dtype`, no optimizer: forward + backward of LM + aux loss, as benchmarks/moe_speed.py's
  model comparison, whose functions this uses): both LM losses before any step, the median step times (moe_speed.alternate), the
  step's useful FLOPs (moe_speed.useful_flops) and the GEMM rate of the same dtype.

GPU_CHECK_FAULTS=memory (the dry run's tests only): the memory case's model saves one extra [T, 4D] tensor for
backward per forward, as a leak of saved activations would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def memory_cpu(case_index: int) -> dict:
    import torch

    import memory_accuracy

    case = memory_accuracy.ACTIVATION_CASES[case_index]
    if "memory" in os.environ.get("GPU_CHECK_FAULTS", "").split(","):
        build = memory_accuracy.build_model

        def leaky(case, dtype=torch.float32):
            model = build(case, dtype)
            extra = torch.nn.Parameter(torch.ones(4, dtype=dtype))

            def hook(_module, _inputs, out_BSD):  # saves a [B, S, 4D] product for backward
                wide = out_BSD.repeat(1, 1, 4) * extra.repeat_interleave(out_BSD.shape[-1])
                return out_BSD + 0 * wide[..., : out_BSD.shape[-1]]
            model.model.embed_tokens.register_forward_hook(hook)
            return model
        memory_accuracy.build_model = leaky
    return memory_accuracy.measure_activation_case(case)


def speed(args: argparse.Namespace) -> dict:
    import torch

    import moe_speed
    from moe_model import MoEForCausalLM
    from moe_model.recipe import load_recipe
    from moe_model.train.export import to_mixtral

    recipe = load_recipe(args.recipe, args.set)
    dtype = moe_speed.DTYPES[args.dtype]
    torch.manual_seed(recipe.train.seed)
    ours = MoEForCausalLM(recipe.moe_config())
    mixtral = to_mixtral(ours)
    mixtral.config.output_router_logits = True  # trains with the aux loss, as ours does
    ours, mixtral = (m.to(args.device, dtype).train() for m in (ours, mixtral))
    ids = torch.randint(0, recipe.model.vocab_size, (recipe.parallel.micro_batch_size, recipe.train.seq_len),
                        generator=torch.Generator().manual_seed(3)).to(args.device)
    with torch.no_grad():  # the LM losses (Mixtral's aux loss sums its router terms otherwise than ours)
        mixtral.config.output_router_logits = False
        losses = {"ours": float(ours(input_ids=ids, labels=ids, use_cache=False).lm_loss),
                  "mixtral": float(mixtral(input_ids=ids, labels=ids, use_cache=False).loss)}
        mixtral.config.output_router_logits = True
    times = moe_speed.alternate({"ours": lambda: moe_speed.fwd_bwd(ours, ids),
                                 "mixtral": lambda: moe_speed.fwd_bwd(mixtral, ids)}, args.steps, args.device,
                                "fwd+bwd")
    flops = moe_speed.useful_flops(ours, ids)
    gemm = moe_speed.gemm_rate(args.device, dtype, 8192 if args.device == "cuda" else 1024)
    return {"device": args.device, "dtype": args.dtype, "tokens": ids.numel(), "losses": losses, "times_s": times,
            "useful_flops": flops, "gemm_flops_s": gemm, "mfu": flops / times["ours"] / (args.peak_tflops * 1e12)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    memory = sub.add_parser("memory-cpu")
    memory.add_argument("--case", type=int, required=True)
    memory.add_argument("--out", type=Path, required=True)
    fast = sub.add_parser("speed")
    fast.add_argument("--recipe", type=Path, required=True)
    fast.add_argument("--set", action="append", default=[])
    fast.add_argument("--device", choices=("cpu", "cuda"), required=True)
    fast.add_argument("--dtype", choices=("fp32", "bf16"), required=True)
    fast.add_argument("--peak-tflops", type=float, required=True)
    fast.add_argument("--steps", type=int, default=5)
    fast.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = memory_cpu(args.case) if args.part == "memory-cpu" else speed(args)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
