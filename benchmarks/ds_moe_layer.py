"""DeepSpeed's MoE layer on expert-parallel ranks: its stock form against the project's, forward + backward.

    .venv/bin/python benchmarks/ds_moe_layer.py            # launches 2 CPU ranks (ep 2) through deepspeed
    .venv/bin/python benchmarks/ds_moe_layer.py --gpus 8   # on a GPU machine: 8 ranks, bf16

Shape: the seed's layer (hidden 1024, expert FFN 2048, gated silu), 64 experts over the ep ranks, top-2,
`--tokens` tokens per rank, dropless. Three forms of `deepspeed.moe.layer.MoE`, all with DeepSpeed's dispatch,
all-to-all, expert groups and expert modules:

- stock: DeepSpeed's own `TopKGate` (second expert without Gumbel sampling, dropless) and its `Experts` loop;
- project: `DeepSpeedMoEBlock` as training builds it (the project's gate, `ProjectGate`, routing exactly as the
  single-device model) with DeepSpeed's `Experts` loop;
- project, grouped (tried, not adopted): the same with its local experts run by one `grouped_expert_ffn` call
  (`GroupedLocalExperts` below), the op that made the single-device block fast.

A step's time is the slowest rank's (forward + backward of the layer, gradients freed); each figure is the median
over `--steps` steps after a warm-up, the forms taking turns step by step. The two project forms get the same
weights and tokens, so their outputs must agree: the largest difference is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results"


def shape(experts: int) -> dict:
    return dict(vocab_size=128, hidden_size=1024, intermediate_size=2048, num_hidden_layers=1, num_attention_heads=16,
                num_key_value_heads=16, head_dim=64, num_local_experts=experts, num_experts_per_tok=2,
                hidden_act="silu")


def grouped_local_experts(experts):
    """DeepSpeed's `Experts` container (same expert modules, parameters and names) run by one grouped op."""
    from deepspeed.moe.experts import Experts

    from moe_model.grouped_ffn import grouped_expert_ffn

    class GroupedLocalExperts(Experts):
        """Input and output [G, E_local, C, D], G the ep source ranks."""

        def __init__(self, adopted: Experts):
            torch.nn.Module.__init__(self)
            self.deepspeed_experts = adopted.deepspeed_experts
            self.num_local_experts = adopted.num_local_experts

        def forward(self, x_GECD: torch.Tensor) -> torch.Tensor:
            G, E, C, D = x_GECD.shape
            modules = list(self.deepspeed_experts)
            x_RD = x_GECD.transpose(0, 1).reshape(E * G * C, D)  # expert-major rows: expert e owns G*C of them
            w_in = [m.gate_up_proj if m.gated else m.up_proj for m in modules]
            y_RD = grouped_expert_ffn(x_RD, w_in, [m.down_proj for m in modules], [G * C] * E,
                                      "silu" if modules[0].gated else "gelu", modules[0].gated)
            return y_RD.view(E, G, C, D).transpose(0, 1)

    return GroupedLocalExperts(experts)


def on_rank(args) -> None:
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE

    from moe_model import MoEConfig
    from moe_model.modeling import MoESparseBlock
    from moe_model.parallel.moe_layer import DeepSpeedMoEBlock, ExpertFFN
    from moe_model.train.distributed import init_distributed

    rank, world = init_distributed()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.gpu else torch.device("cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    config = MoEConfig(**shape(args.experts))
    torch.manual_seed(0)
    dense = MoESparseBlock(config)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)
    project = DeepSpeedMoEBlock(dense, ep=world, ep_rank=rank)
    grouped = DeepSpeedMoEBlock(dense, ep=world, ep_rank=rank)
    grouped.moe.deepspeed_moe.experts = grouped_local_experts(grouped.moe.deepspeed_moe.experts)
    stock = MoE(hidden_size=config.hidden_size, expert=ExpertFFN(config), num_experts=args.experts, ep_size=world,
                k=2, capacity_factor=1.0, min_capacity=0, drop_tokens=False, use_rts=False,
                top2_2nd_expert_sampling=False)
    for p in stock.parameters():
        torch.nn.init.normal_(p, std=0.02)
    forms = {"stock": stock, "project": project, "project_grouped": grouped}
    for m in forms.values():
        m.to(device, dtype).train()
        for layer in m.modules():
            if isinstance(layer, MoE):
                layer.set_deepspeed_parallelism()  # what DeepSpeed's engine does: the expert groups, all-to-all on
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(1, args.tokens, config.hidden_size, generator=generator).to(device, dtype)

    outputs = {}

    def step(name):
        out = forms[name](x)[0]
        outputs[name] = out.detach()
        out.float().pow(2).mean().backward()
        forms[name].zero_grad(set_to_none=True)

    def timed(name):
        if args.gpu:
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        step(name)
        if args.gpu:
            torch.cuda.synchronize()
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the layer is as slow as its slowest rank
        return float(elapsed)

    for name in forms:
        step(name)
    times = {name: [] for name in forms}
    for i in range(args.steps):
        for name in forms:
            times[name].append(timed(name))
        if rank == 0:
            print(f"  step {i + 1}/{args.steps}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()),
                  file=sys.stderr)
    diff = torch.tensor([(outputs["project_grouped"].float() - outputs["project"].float()).abs().max().item()])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if rank == 0:
        result = {"ranks": world, "ep": world, "experts": args.experts, "tokens_per_rank": args.tokens,
                  "device": "cuda" if args.gpu else "cpu", "dtype": str(dtype).replace("torch.", ""),
                  "threads_per_rank": torch.get_num_threads(), "steps_timed": args.steps,
                  "median_step_s": {n: statistics.median(t) for n, t in times.items()},
                  "max_abs_diff_grouped_vs_project": float(diff)}
        Path(args.out).write_text(json.dumps(result, indent=2))


def launch(args) -> int:
    from moe_model.launch import deepspeed_command, rank_env

    out = RESULTS / f"ds_moe_layer_{'cuda' if args.gpus else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    ranks = args.gpus or args.ranks
    cmd = deepspeed_command(ranks, __file__, ["--on-rank", "--out", str(out), "--tokens", str(args.tokens),
                                              "--experts", str(args.experts), "--steps", str(args.steps)]
                            + (["--gpu"] if args.gpus else []))
    env = rank_env(threads=max(1, (os.cpu_count() or 2) // ranks)) if not args.gpus else None
    done = subprocess.run(cmd, env=env)
    if done.returncode:
        print(f"ds_moe_layer: the ranks failed (exit {done.returncode})", file=sys.stderr)
        return done.returncode
    result = json.loads(out.read_text())
    t = result["median_step_s"]
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"DeepSpeed MoE layer, {ranks} ranks (ep {ranks}), {args.experts} experts, "
                        f"{args.tokens} tokens/rank, {result['dtype']}, forward + backward")
    for col in ("form", "step (slowest rank)", "vs stock"):
        table.add_column(col, justify="right" if col != "form" else "left")
    for name, label in (("stock", "DeepSpeed stock (TopKGate + Experts loop)"),
                        ("project", "project: ProjectGate + DeepSpeed's Experts loop"),
                        ("project_grouped", "tried: ProjectGate + one grouped op")):
        table.add_row(label, f"{t[name]:.3f} s", f"{t['stock'] / t[name]:.2f}x")
    Console().print(table)
    print(f"grouped vs project outputs: max |diff| {result['max_abs_diff_grouped_vs_project']:.2e}; wrote {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks (= ep)")
    parser.add_argument("--gpus", type=int, default=0, help="GPU ranks (= ep); bf16")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--on-rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.on_rank:
        on_rank(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
