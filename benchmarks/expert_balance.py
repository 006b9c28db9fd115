"""The experts' load with and without aux-loss-free balancing: recipes/tiny_glm4_moe.yaml (sigmoid scores, a
per-expert score bias, no aux loss) trained on one CPU rank through the real launcher, once per bias update rate.

    .venv/bin/python benchmarks/expert_balance.py [--steps 200] [--rates 0 0.001 0.01] [--set FIELD=VALUE ...]

Prints, per rate, the busiest expert's load over the mean load (the metrics' `expert_load_max_over_mean`: the worst
MoE layer of the step, routes summed over the step's micro-batches) at the first step, averaged over the first and
the last ten steps, and at the last step, with the final loss; writes benchmarks/results/expert_balance.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_model.train.tracking import read_metrics  # noqa: E402
from tests.launch import SINGLE_RANK, failure, launch  # noqa: E402

RECIPE = "recipes/tiny_glm4_moe.yaml"


def train(rate: float, steps: int, out: Path, overrides: list[str]) -> list[dict]:
    result = launch(1, *SINGLE_RANK, *overrides, f"model.router_bias_update_rate={rate}", f"train.steps={steps}",
                    "train.log_every=1", "train.save_last=false", "tracking.wandb.mode=disabled",
                    f"train.output_dir={out}", recipe=RECIPE, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(failure(result))
    return read_metrics(out)


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.001, 0.01])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a recipe override")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rate in args.rates:
            lines = train(rate, args.steps, Path(tmp) / f"rate{rate}", args.set)
            load = [m["expert_load_max_over_mean"] for m in lines]
            rows.append({"rate": rate, "first": load[0], "first_10": mean(load[:10]), "last_10": mean(load[-10:]),
                         "last": load[-1], "loss": lines[-1]["loss"], "steps": args.steps, "overrides": args.set})
    shown = f" ({', '.join(args.set)})" if args.set else ""
    table = Table(title=f"{RECIPE}{shown}, 1 CPU rank, {args.steps} steps, no aux loss: busiest expert's load / mean")
    for column in ("bias update rate", "step 1", "steps 1-10", "last 10", f"step {args.steps}", "final loss"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['rate']:g}", f"{r['first']:.3f}", f"{r['first_10']:.3f}", f"{r['last_10']:.3f}",
                      f"{r['last']:.3f}", f"{r['loss']:.4f}")
    Console().print(table)
    out = ROOT / "benchmarks/results/expert_balance.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
