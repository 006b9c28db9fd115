"""Step time of a CPU training run with glibc's default allocator and with `HEAP_ENV` (what `moe train` gives CPU
ranks; see `moe_model/train/distributed.py`), run back to back under the same conditions, alternating.

    python benchmarks/cpu_allocator.py [--recipe recipes/tiny_text.yaml] [--ranks 4] [--steps 30] [--rounds 2]

Each run is the deepspeed launcher on `moe_model.train.main` (as `moe train` starts it) with every step logged, no
evaluation, no checkpoints, wandb off. The figure is the median `step_time_s` of metrics.jsonl, leaving out the
first `--skip` steps (warm-up); beside it, the minor page faults and system CPU time of the whole run (what the
allocator setting is meant to save). Prints a table and writes benchmarks/results/cpu_allocator.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_model.launch import deepspeed_command, rank_env  # noqa: E402
from moe_model.metrics_file import read_metrics  # noqa: E402
from moe_model.train.distributed import HEAP_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def run(recipe: str, ranks: int, steps: int, heap: bool, out: Path) -> tuple[list[float], dict[str, float]]:
    """The step times (s) of one run, in step order, and what the run's processes cost the kernel: minor page faults
    and system CPU seconds, over the whole run (start-up included), from the launcher's rusage of its children."""
    overrides = [f"train.steps={steps}", "train.log_every=1", "train.eval_every=0", "train.save_every=0",
                 "train.resume=never", "tracking.wandb.mode=disabled", f"train.output_dir={out}"]
    command = deepspeed_command(ranks, "moe_model.train.main", ["--recipe", recipe], module=True, overrides=overrides,
                                launcher_args=["--log_level", "error"])
    env = {k: v for k, v in rank_env(DS_ACCELERATOR="cpu").items() if k not in HEAP_ENV}
    if heap:
        env.update(HEAP_ENV)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    cost = {"minor_page_faults": after.ru_minflt - before.ru_minflt, "sys_cpu_s": after.ru_stime - before.ru_stime}
    return [m["step_time_s"] for m in read_metrics(out / "metrics.jsonl") if "step_time_s" in m], cost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tiny_text.yaml")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the median")
    parser.add_argument("--rounds", type=int, default=2, help="default, heap, default, heap, ...")
    parser.add_argument("--json", default=str(RESULTS / "cpu_allocator.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for heap in (False, True):
                times, cost = run(args.recipe, args.ranks, args.steps, heap, Path(tmp) / f"{r}_{int(heap)}")
                times = times[args.skip:]
                rows.append({"round": r, "allocator": "heap" if heap else "default", "steps": len(times),
                             "median_step_time_s": statistics.median(times), "min_step_time_s": min(times), **cost})
                print(f"round {r} {rows[-1]['allocator']:>7}: median step {rows[-1]['median_step_time_s']:.3f} s "
                      f"(min {rows[-1]['min_step_time_s']:.3f} s, {len(times)} steps); whole run: "
                      f"{cost['minor_page_faults']:,} minor page faults, {cost['sys_cpu_s']:.1f} s system CPU",
                      flush=True)
    print(f"\n{args.recipe}, {args.ranks} CPU ranks, steps {args.skip + 1}-{args.steps} of each run")
    print(f"{'allocator':>10} {'median step (s)':>16} {'per run':>24} {'page faults (median run)':>26}")
    for name in ("default", "heap"):
        mine = [row for row in rows if row["allocator"] == name]
        medians = [row["median_step_time_s"] for row in mine]
        faults = statistics.median(row["minor_page_faults"] for row in mine)
        print(f"{name:>10} {statistics.median(medians):>16.3f} {', '.join(f'{m:.3f}' for m in medians):>24} "
              f"{faults:>26,.0f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"recipe": args.recipe, "ranks": args.ranks, "env": HEAP_ENV,
                                           "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
