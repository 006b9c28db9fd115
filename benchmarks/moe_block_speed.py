"""The model's MoE block (ep 1) forward + backward: this checkout against an earlier commit, and on each kernel.

    .venv/bin/python benchmarks/moe_block_speed.py --against 8007cd3          # CPU, fp32
    .venv/bin/python benchmarks/moe_block_speed.py --device cuda --dtype bf16   # GPU: loop against grouped_mm

Shape: the seed's layer (hidden 1024, expert FFN 2048, gated silu, 64 experts, top-2), one sequence of `--tokens`
(2048); dropless and with capacity factor 1.0. Loss: mean square of the output plus the aux loss. Every variant runs
the same weights and input, and the variants take turns step by step (one warm-up each), so that a busy shared
machine slows them alike; each figure is the median of `--steps` timed steps, wall time and the process's CPU time
(user + system, all threads), and against `--against` the median over rounds of each round's ratio (a busy spell
of the machine slows both sides of a round).

Variants: `now` (this checkout, the kernel `grouped_backend` picks), the other kernel forced (`force_backend`; on
CPU torch._grouped_mm is aten's per-expert loop), and with `--against REV` the block at REV (the package's model
files at that commit, imported as another package).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_model import MoEConfig  # noqa: E402
from moe_model.grouped_ffn import BACKENDS, force_backend, grouped_backend  # noqa: E402
from moe_model.modeling import MoESparseBlock  # noqa: E402

MODEL_FILES = ("configuration.py", "modeling.py", "routing.py", "grouped_ffn.py", "losses.py")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def old_block_class(rev: str, where: Path):
    """MoESparseBlock as of `rev`: its model files, whose imports are relative, as package `moe_at_rev`."""
    pkg = where / "moe_at_rev"
    pkg.mkdir()
    for name in MODEL_FILES:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:moe_model/{name}"], check=True,
                              capture_output=True, text=True).stdout
        (pkg / name).write_text(text)
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(where))
    return importlib.import_module("moe_at_rev.modeling").MoESparseBlock, importlib.import_module(
        "moe_at_rev.configuration").MoEConfig


def config(cls, capacity_factor, experts: int):
    return cls(vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=1, num_attention_heads=16,
               num_key_value_heads=16, head_dim=64, num_local_experts=experts, num_experts_per_tok=2,
               hidden_act="silu", capacity_factor=capacity_factor)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_fn(block, x, backend: str | None):
    def step():
        with force_backend(backend) if backend else contextlib.nullcontext():
            y, router = block(x)
            (y.float().square().mean() + router.aux_loss).backward()
        block.zero_grad(set_to_none=True)
        x.grad = None
    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default=None, help="a commit whose MoE block to time as well")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("moe_block_speed: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, result = DTYPES[args.dtype], {"device": args.device, "dtype": args.dtype, "tokens": args.tokens,
                                         "threads": torch.get_num_threads(), "torch": torch.__version__,
                                         "experts": args.experts}
    with tempfile.TemporaryDirectory() as tmp:
        old = old_block_class(args.against, Path(tmp)) if args.against else None
        for cf in (None, 1.0):
            torch.manual_seed(0)
            block = MoESparseBlock(config(MoEConfig, cf, args.experts))
            for p in block.parameters():
                torch.nn.init.normal_(p, std=0.02)
            block = block.to(args.device, dtype)
            x = torch.randn(1, args.tokens, 1024, device=args.device, dtype=dtype, requires_grad=True)
            picked = grouped_backend(x, block.experts.gate_up_proj, block.experts.down_proj)
            fns = {f"now ({picked})": step_fn(block, x, None)}
            fns.update({f"now, {b} forced": step_fn(block, x, b) for b in BACKENDS if b != picked})
            if old is not None:
                old_block = old[0](config(old[1], cf, args.experts)).to(args.device, dtype)
                old_block.load_state_dict(block.state_dict())
                fns[args.against] = step_fn(old_block, x, None)
            times: dict[str, list[float]] = {name: [] for name in fns}
            cpu: dict[str, list[float]] = {name: [] for name in fns}
            for fn in fns.values():
                fn()
            for i in range(args.steps):
                for name, fn in fns.items():
                    synchronize(args.device)
                    start, start_cpu = time.perf_counter(), time.process_time()
                    fn()
                    synchronize(args.device)
                    times[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
                print(f"  cf={cf} step {i + 1}/{args.steps}: "
                      + ", ".join(f"{n} {t[-1]:.3f} s ({cpu[n][-1]:.3f} s CPU)" for n, t in times.items()),
                      file=sys.stderr)
            result[f"capacity_factor={cf}"] = {
                n: {"median_s": statistics.median(t), "median_cpu_s": statistics.median(cpu[n]), "steps_s": t,
                    "steps_cpu_s": cpu[n]} for n, t in times.items()}
    print(f"MoE block forward + backward, {args.device} {args.dtype}, seed layer shape, {args.tokens} tokens "
          f"(median of {args.steps})")
    for case, figures in ((k, v) for k, v in result.items() if k.startswith("capacity")):
        base = figures[args.against] if args.against else None
        for name, f in figures.items():
            if base:  # each step against the base's step of the same round: slow spells of the machine cancel
                f["paired_ratio"] = statistics.median(a / b for a, b in zip(f["steps_s"], base["steps_s"]))
                f["paired_cpu_ratio"] = statistics.median(a / b for a, b in zip(f["steps_cpu_s"], base["steps_cpu_s"]))
            ratio = (f"  x {args.against}: {f['paired_ratio']:.3f} wall, {f['paired_cpu_ratio']:.3f} CPU "
                     "(median of the rounds' ratios)" if base else "")
            print(f"  {case:22s} {name:24s} {f['median_s']:.3f} s, CPU {f['median_cpu_s']:.3f} s{ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
