"""DeepSpeed's AutoEP MoE layer against its legacy layer on expert-parallel ranks, at controlled routing skew.

    .venv/bin/python benchmarks/ds_moe_layer.py                        # CPU: 2 then 4 ranks (ep = ranks), skew 1 2 4
    .venv/bin/python benchmarks/ds_moe_layer.py --tokens 2048 --ranks 2   # the seed's layer shape exactly
    .venv/bin/python benchmarks/ds_moe_layer.py --gpus 8               # on a GPU machine: 8 ranks, bf16

Shape: the seed's layer (hidden 1024, expert FFN 2048, gated silu), 64 experts split over the ep ranks, top-2,
dropless, `--tokens` tokens per rank (CPU default 512 so that `make bench` stays within minutes; 2048 is the seed's).
Three forms, all built as training builds them:

- legacy stock: DeepSpeed's `deepspeed.moe.layer.MoE` with its own `TopKGate` (second expert by argmax, no Gumbel
  sampling, dropless) and its `Experts` loop;
- legacy project: `DeepSpeedMoEBlock` (`moe_backend: legacy`): the same layer with the project's gate;
- AutoEP: `AutoEPBlock` (`moe_backend: autoep`) around the project's `MoESparseBlock`, converted by
  `deepspeed.initialize` with the `expert_parallel` section `autoep_section` writes, as `train.engine` does:
  DeepSpeed's `AutoEPMoELayer` (variable-split all-to-all, grouped expert GEMMs, no capacity padding).

All three hold the same weights (the stock gate gets the project's router matrix), so the stock gate routes the same
tokens by its own rule (top-1 argmax, then argmax of the rest) and its measured skew is printed beside the others.

Skew: each rank's tokens are steered so that the project's router (and AutoEP's, the same function on the same
matrix) sends a designed set of routes: expert 0 takes `skew` x the mean load (capped at one route per token), the
other experts share the rest as evenly as integers allow (`skewed_loads`), a token's k routes go to k different
experts (`skewed_routes`). A token is `z + pinv(W) @ target` with `z` ~ N(0, 1) and `target` STEER - j on the token's
j-th designed expert, 0 elsewhere, so its router logits are `W z + target` (`steering_tokens`). The measured
busiest/mean (over all ranks' routes) is printed next to the target, and the project's counts must equal the design.
The legacy layer is dropless by padding every expert's buffer to the busiest expert's depth; AutoEP pads nothing.

A step is the slowest rank's forward + backward of the layer (gradients freed); each figure is the median over
`--steps` steps after one warm-up step, the forms taking turns step by step (the first form rotating), and each ratio
AutoEP / legacy is taken from medians of one launch (one launch per rank count). AutoEP and the legacy project form
compute the same function on the same weights and tokens: their largest output difference is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results"
FORMS = ("stock", "project", "autoep")
STEER = 8.0  # router logit added for a token's first designed expert; STEER - j for its j-th


def shape(experts: int, hidden: int, ffn: int) -> dict:
    heads = max(1, hidden // 64)
    return dict(vocab_size=128, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=1,
                num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads,
                num_local_experts=experts, num_experts_per_tok=2, hidden_act="silu")


def skewed_loads(tokens: int, experts: int, top_k: int, skew: float) -> list[int]:
    """Routes per expert for `tokens` tokens at top-k: expert 0 takes round(skew x mean) (at least the mean rounded
    up, at most one route per token), experts 1.. share the rest as evenly as integers allow."""
    total = tokens * top_k
    hot = min(max(round(skew * total / experts), math.ceil(total / experts)), tokens)
    base, extra = divmod(total - hot, experts - 1)
    return [hot] + [base + (i < extra) for i in range(experts - 1)]


def skewed_routes(tokens: int, experts: int, top_k: int, skew: float, generator: torch.Generator) -> torch.Tensor:
    """Designed experts [T, k] (int64) with `skewed_loads` per expert and k different experts per token.

    The routes sorted by expert form runs of at most T (no load exceeds T); token t takes routes t, t + T, ...,
    which are T apart and so never in one run. The token order is then shuffled."""
    loads = torch.tensor(skewed_loads(tokens, experts, top_k, skew))
    experts_TK = torch.repeat_interleave(torch.arange(experts), loads).view(top_k, tokens).t()
    return experts_TK[torch.randperm(tokens, generator=generator)].contiguous()


def steering_tokens(gate_ED: torch.Tensor, experts_TK: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Tokens [T, D] whose router logits `W x` are `W z + target`: x = z + pinv(W) target, z ~ N(0, 1), target
    STEER - j on the token's j-th designed expert and 0 elsewhere (W [E, D] has full row rank E <= D, so
    W pinv(W) = I). With W ~ N(0, 0.02^2), `W z` has std 0.02 sqrt(D) (0.64 at D = 1024), far under the margin."""
    T, K = experts_TK.shape
    E, D = gate_ED.shape
    target_TE = torch.zeros(T, E)
    target_TE.scatter_(1, experts_TK, (STEER - torch.arange(K, dtype=torch.float32)).expand(T, K))
    z_TD = torch.randn(T, D, generator=generator)
    return z_TD + target_TE @ torch.linalg.pinv(gate_ED.float()).t()


def autoep_layer(dense, world: int):
    """`AutoEPBlock(dense)` after `deepspeed.initialize` converted it, as `train.engine.build_engine` does: the
    `expert_parallel` section from `autoep_section`, module name `mlp.moe` (its `MODULE_PATTERN`), ZeRO-0."""
    import deepspeed

    from moe_model.parallel.autoep import AutoEPBlock, autoep_section

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = AutoEPBlock(dense)

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
              "expert_parallel": autoep_section(dense.config, world)}
    engine, _, _, _ = deepspeed.initialize(model=Holder(), config=config)
    block = engine.module.mlp
    if type(block.moe).__name__ != "AutoEPMoELayer":
        raise RuntimeError(f"deepspeed.initialize left the block unconverted ({type(block.moe).__name__})")
    return block


def build_forms(config, world: int, rank: int):
    """(forms by name, router matrix [E, D]): the three forms of the module docstring on the same weights."""
    from deepspeed.moe.layer import MoE

    from moe_model.modeling import MoESparseBlock
    from moe_model.parallel.moe_layer import DeepSpeedMoEBlock, ExpertFFN

    torch.manual_seed(0)
    dense = MoESparseBlock(config)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)
    gate_ED = dense.gate.weight.detach().clone()
    project = DeepSpeedMoEBlock(dense, ep=world, ep_rank=rank)
    stock = MoE(hidden_size=config.hidden_size, expert=ExpertFFN(config), num_experts=config.num_local_experts,
                ep_size=world, k=config.num_experts_per_tok, capacity_factor=1.0, min_capacity=0, drop_tokens=False,
                use_rts=False, top2_2nd_expert_sampling=False)
    stock.deepspeed_moe.gate.wg.weight.data.copy_(gate_ED)
    stock.deepspeed_moe.experts.load_state_dict(project.moe.deepspeed_moe.experts.state_dict())
    autoep = autoep_layer(dense, world)  # converts `dense` in place: its full expert stack is dropped
    for m in (stock, project):
        for layer in m.modules():
            if isinstance(layer, MoE):
                layer.set_deepspeed_parallelism()  # what DeepSpeed's engine does: the expert groups, all-to-all on
    return {"stock": stock, "project": project, "autoep": autoep}, gate_ED


class Stepper:
    """Forward + backward of one form on one rank's tokens, keeping the output and the routes per expert it took."""

    def __init__(self, forms: dict, gpu: bool, on: torch.device):
        self.forms, self.gpu, self.on = forms, gpu, on
        self.outputs: dict[str, torch.Tensor] = {}
        self._stock_counts: dict[str, torch.Tensor] = {}
        # DeepSpeed's TopKGate returns its routes per expert last (`exp_counts`); MoE.forward does not pass them on
        forms["stock"].deepspeed_moe.gate.register_forward_hook(
            lambda mod, args, out: self._stock_counts.__setitem__("E", out[-1]))

    def step(self, name: str, x_BSD: torch.Tensor) -> torch.Tensor:
        """Routes per expert [E] this rank's tokens took in this step."""
        out = self.forms[name](x_BSD)
        y_BSD = out[0]
        self.outputs[name] = y_BSD.detach()
        y_BSD.float().pow(2).mean().backward()
        self.forms[name].zero_grad(set_to_none=True)
        return self._stock_counts.pop("E") if name == "stock" else out[1].expert_counts_E

    def timed(self, name: str, x_BSD: torch.Tensor) -> float:
        """Seconds of the slowest rank: the layer is as slow as its slowest rank."""
        import torch.distributed as dist

        if self.gpu:
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        self.step(name, x_BSD)
        if self.gpu:
            torch.cuda.synchronize()
        elapsed = torch.tensor([time.perf_counter() - start], device=self.on)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed)

    def largest(self, values: torch.Tensor) -> float:
        """Max over ranks of a tensor's largest absolute value."""
        import torch.distributed as dist

        m = values.float().abs().max().reshape(1).to(self.on)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        return float(m)

    def global_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """Routes per expert summed over the ranks (CPU, int64)."""
        import torch.distributed as dist

        counts_E = counts_E.detach().to(self.on, torch.int64)
        dist.all_reduce(counts_E)
        return counts_E.cpu()


def busiest_over_mean(counts_E: torch.Tensor) -> float:
    return float(counts_E.max() / counts_E.float().mean())


def measure_skew(stepper: Stepper, skew: float, x_BSD: torch.Tensor, designed_E: torch.Tensor, steps: int,
                 rank: int, world: int) -> dict:
    """One table row: warm-up (routing checked against the design, outputs compared), then `steps` timed turns."""
    measured = {}
    for name in FORMS:
        counts_E = stepper.global_counts(stepper.step(name, x_BSD))
        measured[name] = busiest_over_mean(counts_E)
        if name != "stock" and not torch.equal(counts_E, designed_E):
            raise RuntimeError(f"{name}: routes per expert {counts_E.tolist()} differ from the design "
                               f"{designed_E.tolist()}: the steering margin is too small for this shape")
    out = stepper.outputs
    diffs = {name: stepper.largest(out[name].float() - out["project"].float()) for name in ("stock", "autoep")}
    times = {name: [] for name in FORMS}
    for i in range(steps):
        for name in FORMS[i % len(FORMS):] + FORMS[:i % len(FORMS)]:
            times[name].append(stepper.timed(name, x_BSD))
        if rank == 0:
            print(f"  {world} ranks, skew {skew:g}, step {i + 1}/{steps}: "
                  + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()), file=sys.stderr)
    median = {n: statistics.median(t) for n, t in times.items()}
    return {"ranks": world, "skew_target": skew, "skew_measured": measured, "median_step_s": median,
            "autoep_over_legacy_project": median["autoep"] / median["project"],
            "autoep_over_legacy_stock": median["autoep"] / median["stock"],
            "max_abs_diff_vs_legacy_project": diffs, "max_abs_output_legacy_project": stepper.largest(out["project"])}


def on_rank(args) -> None:
    from moe_model import MoEConfig
    import torch.distributed as dist

    from moe_model.train.distributed import close_distributed, collective_device, init_distributed

    rank, world = init_distributed()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.gpu else torch.device("cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    config = MoEConfig(**shape(args.experts, args.hidden, args.ffn))
    E, K = config.num_local_experts, config.num_experts_per_tok
    forms, gate_ED = build_forms(config, world, rank)
    for m in forms.values():
        m.to(device, dtype).train()
    stepper = Stepper(forms, args.gpu, collective_device())  # gloo: CPU tensors, NCCL: this rank's GPU
    rows = []
    for skew in args.skews:
        generator = torch.Generator().manual_seed(1000 * rank + round(100 * skew))
        designed_TK = skewed_routes(args.tokens, E, K, skew, generator)
        x_BSD = steering_tokens(gate_ED, designed_TK, generator).view(1, args.tokens, -1).to(device, dtype)
        designed_E = stepper.global_counts(torch.bincount(designed_TK.reshape(-1), minlength=E))
        rows.append(measure_skew(stepper, skew, x_BSD, designed_E, args.steps, rank, world))
    if rank == 0:
        result = {"ranks": world, "ep": world, "experts": E, "top_k": K, "hidden": args.hidden, "ffn": args.ffn,
                  "tokens_per_rank": args.tokens, "device": device.type, "dtype": str(dtype).replace("torch.", ""),
                  "threads_per_rank": torch.get_num_threads(), "steps_timed": args.steps, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=2))
    # every rank leaves together and tears gloo down first: a rank whose interpreter exits with gloo's threads still
    # alive aborts ("terminate called without an active exception", exit -6), which failed CI once
    dist.barrier()
    close_distributed()


def launch_one(args, ranks: int, out: Path) -> dict:
    from moe_model.launch import deepspeed_command, rank_env
    from moe_model.train.distributed import launch_env

    flags = ["--on-rank", "--out", str(out), "--tokens", str(args.tokens), "--experts", str(args.experts),
             "--hidden", str(args.hidden), "--ffn", str(args.ffn), "--steps", str(args.steps),
             "--skews", *[f"{s:g}" for s in args.skews]]
    cmd = deepspeed_command(ranks, __file__, flags + (["--gpu"] if args.gpus else []))
    env = None if args.gpus else rank_env(threads=max(1, (os.cpu_count() or 2) // ranks), **launch_env())
    done = subprocess.run(cmd, env=env)
    if done.returncode:
        raise SystemExit(f"ds_moe_layer: the {ranks} ranks failed (exit {done.returncode})")
    return json.loads(out.read_text())


def print_table(runs: list[dict], args) -> None:
    from rich.console import Console
    from rich.table import Table

    first = runs[0]
    table = Table(title=f"One MoE layer, forward + backward, slowest rank, median of {args.steps} steps: hidden "
                        f"{first['hidden']}, FFN {first['ffn']} (silu), {first['experts']} experts top-{first['top_k']}, "
                        f"{first['tokens_per_rank']} tokens/rank, {first['dtype']}, ep = ranks",
                  caption="AutoEP / legacy: ratio of medians from one launch (< 1: AutoEP faster); busiest/mean over "
                          "all ranks' routes; max |AutoEP - project|: largest output difference, same weights and tokens")
    columns = ("ranks", "skew target", "busiest/mean project = AutoEP", "busiest/mean stock", "legacy stock",
               "legacy project", "AutoEP", "AutoEP / legacy project", "AutoEP / legacy stock",
               "max |AutoEP - project|")
    for col in columns:
        table.add_column(col, justify="right")
    for run in runs:
        for row in run["rows"]:
            t, m = row["median_step_s"], row["skew_measured"]
            table.add_row(str(row["ranks"]), f"{row['skew_target']:g}", f"{m['project']:.2f} = {m['autoep']:.2f}",
                          f"{m['stock']:.2f}", f"{t['stock']:.3f} s", f"{t['project']:.3f} s", f"{t['autoep']:.3f} s",
                          f"{row['autoep_over_legacy_project']:.2f}", f"{row['autoep_over_legacy_stock']:.2f}",
                          f"{row['max_abs_diff_vs_legacy_project']['autoep']:.1e}")
    Console(width=200).print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="CPU rank counts (= ep), one launch each")
    parser.add_argument("--gpus", type=int, default=0, help="GPU ranks (= ep), one launch; bf16")
    parser.add_argument("--skews", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                        help="busiest expert's load over the mean")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2048, help="one expert's FFN width")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per rank (default: 512 on CPU, 2048 on GPU)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="where the JSON goes (default: benchmarks/results/)")
    parser.add_argument("--on-rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokens is None:
        args.tokens = 2048 if args.gpus or args.gpu else 512
    rank_counts = [args.gpus] if args.gpus else args.ranks
    problem = next((f"--experts {args.experts} is not a multiple of {r} ranks (ep = ranks)" for r in rank_counts
                    if args.experts % r), None)
    if args.experts > args.hidden:
        problem = f"--experts {args.experts} exceeds --hidden {args.hidden}: the routing steer needs E <= hidden"
    if any(s < 1 for s in args.skews):
        problem = "--skews are busiest/mean loads and must be >= 1"
    if problem:
        print(f"ds_moe_layer: {problem}", file=sys.stderr)
        return 2
    if args.on_rank:
        on_rank(args)
        return 0
    with tempfile.TemporaryDirectory() as parts:
        runs = [launch_one(args, r, Path(parts) / f"ranks{r}.json") for r in rank_counts]
    print_table(runs, args)
    out = args.json or RESULTS / f"ds_moe_layer_{'cuda' if args.gpus else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
