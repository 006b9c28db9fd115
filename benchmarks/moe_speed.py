"""Training-step speed of the model against transformers' Mixtral, the machine's GEMM rate and DeepSpeed's engine.

    .venv/bin/python benchmarks/moe_speed.py                 # CPU, fp32 (the development machines)
    .venv/bin/python benchmarks/moe_speed.py --device cuda   # GPU, bf16: tokens/s and MFU against --peak-tflops

Shape: the seed's layer (hidden 1024, 16 heads x 64, expert FFN 2048) with gated silu experts so that Mixtral can run
it, `--layers` layers (2), 64 experts, top-2, one sequence of `--tokens` (2048), vocabulary 32000.

Every ratio is measured in one run of this script: the two models (same weights, so the same routing) and the two
step paths take turns step by step, and each figure is the median of `--steps` timed steps after one warm-up step.

- model vs Mixtral: forward + backward (loss = LM loss + aux loss on both; Mixtral with `output_router_logits`), the
  gradients freed after each step as `zero_grad()` does. Peak memory: on CPU each model runs in a fresh child
  process (glibc's default allocator in either mode) and the figure is its peak resident set (VmHWM, reset once the
  model is built) less the resident set then,
  i.e. what a training step adds on top of the weights; on GPU `max_memory_allocated` over the same steps.
- fraction of the GEMM rate: the step's useful FLOPs (the matrix products counted by torch's `FlopCounterMode` on
  our model's step, plus the causal attention scores 2 x 2*S^2*Dq/2 per layer, x3 for forward + backward) over the
  step time, against the median rate of a square GEMM of the same dtype measured in the same run.
- DeepSpeed 1 rank: the training code's `build_engine` against the bare model with torch's fused AdamW (the
  kernel our DeepSpeed config asks for), both running forward + backward + clipping + optimizer step on the same
  shape (`--engine-layers`, 1 by default so that two copies with Adam states fit in 24 GB), once per ZeRO stage of
  `--zero-stages` (0,1), each in a fresh process. ZeRO-1 on one rank partitions nothing but still copies every
  gradient into its buckets and the updated fp32 partition back into the weights.
- `--allocator heap` (CPU): the same run with glibc told never to hand large blocks to mmap
  (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_ huge), so freed memory is reused instead of returned to the kernel,
  as a GPU's caching allocator does. glibc's default serves every block over 32 MB with a fresh mmap: each step's
  gradients, logits and activations are first-touch page faults, which on these virtual machines cost about as
  much as the products themselves (see the `sys` time of a run). The two modes separate the models' arithmetic
  from the machine's page-fault cost; both models always share one mode.
- DeepSpeed's MoE layers on EP ranks: see `benchmarks/ds_moe_layer.py` (its own launches, 2 and 4 ranks, AutoEP
  against legacy at skew 1, 2, 4).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_model import MoEConfig, MoEForCausalLM  # noqa: E402
from moe_model.grouped_ffn import force_backend  # noqa: E402
from moe_model.train.distributed import HEAP_ENV  # noqa: E402  (glibc: never mmap large blocks)
from moe_model.train.export import to_mixtral  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def seed_layer_shape(layers: int, vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=1024, intermediate_size=2048, num_hidden_layers=layers,
                num_attention_heads=16, num_key_value_heads=16, head_dim=64, num_local_experts=64,
                num_experts_per_tok=2, hidden_act="silu", max_position_embeddings=4096)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gemm_rate(device: str, dtype: torch.dtype, n: int, repeats: int = 7) -> float:
    """FLOP/s of an [n, n] x [n, n] product (median)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def build_pair(args) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ours = MoEForCausalLM(MoEConfig(**seed_layer_shape(args.layers, args.vocab)))
    mixtral = to_mixtral(ours)
    mixtral.config.output_router_logits = True  # train with the aux loss as ours does
    dtype = DTYPES[args.dtype]
    return ours.to(args.device, dtype).train(), mixtral.to(args.device, dtype).train()


def fwd_bwd(model, ids) -> None:
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)


def timed(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def alternate(fns: dict, steps: int, device: str, label: str) -> dict[str, float]:
    """Median seconds of each fn, run in turns (one warm-up each first)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for i in range(steps):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
        print(f"  {label} step {i + 1}/{steps}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()),
              file=sys.stderr)
    return {name: statistics.median(t) for name, t in times.items()}


def useful_flops(model, ids) -> float:
    """Matrix-product FLOPs of one forward + backward (counted) plus the causal attention scores (analytic)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with force_backend("loop"), counter:  # torch's FlopCounterMode has no formula for _grouped_mm (same products)
        fwd_bwd(model, ids)
    c = model.config
    S = ids.shape[1]
    scores = c.num_hidden_layers * 3 * 2 * (2 * S * S * c.num_attention_heads * c.head_dim) / 2
    return counter.get_total_flops() + scores


def proc_status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_peak_memory(args, which: str) -> int:
    """Bytes a step adds on top of the built model, measured in a fresh process (CPU)."""
    cmd = [sys.executable, __file__, "--peak-of", which, "--layers", str(args.layers), "--vocab", str(args.vocab),
           "--tokens", str(args.tokens), "--dtype", args.dtype]
    # always glibc's default: with the heap allocator freed blocks stay resident, so the resident set would count
    # the building of the model and not what a step holds
    env = {k: v for k, v in os.environ.items() if k not in HEAP_ENV}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return int(json.loads(out.strip().splitlines()[-1])["step_peak_bytes"])


def peak_of(args) -> None:
    torch.manual_seed(0)
    ours = MoEForCausalLM(MoEConfig(**seed_layer_shape(args.layers, args.vocab)))
    model = ours if args.peak_of == "ours" else to_mixtral(ours)
    if args.peak_of == "mixtral":
        model.config.output_router_logits = True
        del ours
    model = model.to(dtype=DTYPES[args.dtype]).train()
    ids = torch.randint(0, args.vocab, (1, args.tokens))
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to what is resident now
    built = proc_status_bytes("VmRSS")
    for _ in range(2):
        fwd_bwd(model, ids)
    print(json.dumps({"step_peak_bytes": proc_status_bytes("VmHWM") - built}))


def gpu_peak_memory(model, ids) -> int:
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd(model, ids)
    return torch.cuda.max_memory_allocated() - base


def model_vs_mixtral(args) -> dict:
    ours, mixtral = build_pair(args)
    ids = torch.randint(0, args.vocab, (1, args.tokens), device=args.device)
    times = alternate({"ours": lambda: fwd_bwd(ours, ids), "mixtral": lambda: fwd_bwd(mixtral, ids)},
                      args.steps, args.device, "fwd+bwd")
    flops = useful_flops(ours, ids)
    if args.device == "cuda":
        peaks = {"ours": gpu_peak_memory(ours, ids), "mixtral": gpu_peak_memory(mixtral, ids)}
    else:
        del ours, mixtral
        peaks = {name: child_peak_memory(args, name) for name in ("ours", "mixtral")}
    return {"times_s": times, "useful_flops": flops, "step_peak_bytes": peaks}


def deepspeed_vs_bare(args) -> dict:
    """One rank: DeepSpeed's engine (the training code's build_engine) against the bare model + AdamW."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from moe_model.launch import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    from moe_model.parallel import Layout
    from moe_model.recipe import recipe_from_dict
    from moe_model.train.distributed import init_distributed
    from moe_model.train.engine import build_engine

    init_distributed()
    shape = seed_layer_shape(args.engine_layers, args.vocab)
    model_keys = [k for k in shape if k != "max_position_embeddings"]
    recipe = recipe_from_dict({
        "name": "speed-engine", "model": {k: shape[k] for k in model_keys},
        "parallel": {"tp": 1, "pp": 1, "ep": 1, "dp": 1, "zero_stage": args.zero_stage, "micro_batch_size": 1},
        "train": {"global_batch_size": 1, "seq_len": args.tokens, "steps": 10, "lr": 1e-4, "warmup_steps": 0,
                  "precision": args.dtype, "weight_decay": 0.1, "grad_clip": 1.0},
        "data": {"source": "synthetic"}})
    engine, step, ds_config = build_engine(recipe, Layout(tp=1, pp=1, ep=1, dp=1))
    torch.manual_seed(recipe.train.seed)
    bare = MoEForCausalLM(recipe.moe_config()).to(args.device, DTYPES[args.dtype]).train()
    optimizer = torch.optim.AdamW(bare.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                  fused=True)  # the kernel the DeepSpeed config asks torch for
    ids = torch.randint(0, args.vocab, (1, args.tokens))

    def bare_step():
        bare(input_ids=ids.to(args.device), labels=ids.to(args.device), use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = alternate({"bare": bare_step, "deepspeed": lambda: step([ids])}, args.steps, args.device,
                      f"train step ZeRO-{args.zero_stage}")
    return {"times_s": times, "layers": args.engine_layers, "zero_stage": args.zero_stage, "ds_config": ds_config}


def engine_in_child(args, zero_stage: int) -> dict:
    """`deepspeed_vs_bare` in a fresh process (its own process group; two 1-layer copies with Adam states)."""
    cmd = [sys.executable, __file__, "--engine-child", "--zero-stage", str(zero_stage), "--device", args.device,
           "--dtype", args.dtype, "--engine-layers", str(args.engine_layers), "--vocab", str(args.vocab),
           "--tokens", str(args.tokens), "--steps", str(args.steps)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def mixtral_rows(args, mvm: dict, gemm: float) -> list[tuple[str, str]]:
    t, peak = mvm["times_s"], mvm["step_peak_bytes"]
    rate = mvm["useful_flops"] / t["ours"]
    rows = [("ours: forward + backward", f"{t['ours']:.3f} s"),
            ("Mixtral: forward + backward", f"{t['mixtral']:.3f} s"),
            ("speed-up over Mixtral", f"{t['mixtral'] / t['ours']:.2f}x"),
            ("ours: useful rate", f"{rate / 1e9:.1f} GFLOP/s"),
            ("ours: fraction of the GEMM rate", f"{rate / gemm:.0%}"),
            ("Mixtral: fraction of the GEMM rate", f"{mvm['useful_flops'] / t['mixtral'] / gemm:.0%}"),
            ("step peak memory, ours", f"{peak['ours'] / 2**30:.2f} GiB"),
            ("step peak memory, Mixtral", f"{peak['mixtral'] / 2**30:.2f} GiB"),
            ("peak memory ours / Mixtral", f"{peak['ours'] / peak['mixtral']:.3f}")]
    if args.device == "cuda":
        rows += [("ours: tokens/s", f"{args.tokens / t['ours']:,.0f}"),
                 ("ours: MFU (vs --peak-tflops)", f"{rate / (args.peak_tflops * 1e12):.1%}")]
    return rows


def table(rows: list[tuple[str, str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("figure")
    t.add_column("value", justify="right")
    for name, value in rows:
        t.add_row(name, value)
    Console().print(t)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default fp32 on cpu, bf16 on cuda")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--engine-layers", type=int, default=1)
    parser.add_argument("--zero-stages", default="0,1", help="ZeRO stages of the engine comparison")
    parser.add_argument("--zero-stage", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--engine-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense peak (GPU mode's MFU)")
    parser.add_argument("--parts", default="mixtral,engine",
                        help="comma-separated: mixtral (model vs Mixtral), engine (DeepSpeed 1 rank vs bare)")
    parser.add_argument("--json", default=None, help="default benchmarks/results/moe_speed_<device>.json")
    parser.add_argument("--allocator", choices=("default", "heap"), default="default",
                        help="heap: glibc never mmaps large blocks (CPU; see the module docstring)")
    parser.add_argument("--peak-of", choices=("ours", "mixtral"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.allocator == "heap" and any(os.environ.get(k) != v for k, v in HEAP_ENV.items()):
        # glibc reads these once at start: run this script again with them (children inherit them)
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], {**os.environ, **HEAP_ENV})
    if args.peak_of:
        peak_of(args)
        return 0
    if args.engine_child:
        print(json.dumps(deepspeed_vs_bare(args), default=str))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("moe_speed: --device cuda but torch sees no GPU; run on a GPU machine or use --device cpu",
              file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    gemm_n = 8192 if args.device == "cuda" else 4096
    result: dict = {"device": args.device, "dtype": args.dtype, "allocator": args.allocator, "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "shape": seed_layer_shape(args.layers, args.vocab),
                    "tokens": args.tokens, "steps_timed": args.steps}
    result["gemm_flops_s"] = gemm_rate(args.device, dtype, gemm_n)
    parts = set(args.parts.split(","))
    rows = [(f"GEMM rate ({gemm_n}^3, {args.dtype})", f"{result['gemm_flops_s'] / 1e9:.1f} GFLOP/s")]
    if "mixtral" in parts:
        result["model_vs_mixtral"] = mvm = model_vs_mixtral(args)
        rows += mixtral_rows(args, mvm, result["gemm_flops_s"])
    if "engine" in parts:
        result["deepspeed_vs_bare"] = runs = [engine_in_child(args, int(z)) for z in args.zero_stages.split(",")]
        for run in runs:
            d, z = run["times_s"], run["zero_stage"]
            rows += [(f"ZeRO-{z} run: bare model + fused AdamW ({args.engine_layers} layer)", f"{d['bare']:.3f} s"),
                     (f"ZeRO-{z} run: DeepSpeed engine, 1 rank", f"{d['deepspeed']:.3f} s"),
                     (f"ZeRO-{z} run: DeepSpeed / bare", f"{d['deepspeed'] / d['bare']:.3f}")]
    table(rows, f"MoE training step, {args.device} {args.dtype}, seed layer shape, {args.tokens} tokens, "
                f"{args.allocator} allocator")
    suffix = args.device if args.device == "cuda" else f"cpu_{args.allocator}"
    out = Path(args.json) if args.json else RESULTS / f"moe_speed_{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
