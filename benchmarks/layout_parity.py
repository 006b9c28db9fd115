"""Per-step losses of parallel layouts (`tests/layouts.py`) against one rank, through the real launcher on CPU ranks
(fp32, dropless), on both MoE backends.

    .venv/bin/python benchmarks/layout_parity.py [--steps 7]

Prints the largest relative difference per layout and metric, and writes benchmarks/results/layout_parity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_model.train.tracking import read_metrics  # noqa: E402
from tests.launch import SINGLE_RANK, failure, launch  # noqa: E402
from tests.layouts import LAYOUTS, micro_batch_overrides  # noqa: E402

KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm")


def run(ranks: int, overrides: tuple[str, ...], steps: int, out: Path) -> tuple[list[dict], float]:
    common = (f"train.steps={steps}", "train.warmup_steps=2", "train.log_every=1", "tracking.wandb.mode=disabled",
              f"train.output_dir={out}")
    t0 = time.perf_counter()
    result = launch(ranks, *overrides, *common)
    if result.returncode != 0:
        raise SystemExit(failure(result))
    return read_metrics(out), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory() as tmp:
        references, ref_wall = {}, 0.0
        rows = {}
        for name, (ranks, *overrides) in LAYOUTS.items():
            shared = micro_batch_overrides(overrides)
            if shared not in references:
                references[shared], wall = run(1, SINGLE_RANK + shared, args.steps, Path(tmp) / f"one{len(references)}")
                ref_wall += wall
            reference = references[shared]
            metrics, wall = run(ranks, tuple(overrides), args.steps, Path(tmp) / name.replace(" ", "_"))
            worst = {k: max(abs(a[k] - b[k]) / abs(a[k]) for a, b in zip(reference, metrics, strict=True))
                     for k in KEYS}
            rows[name] = {"ranks": ranks, "wall_s": wall, "max_rel_diff": worst,
                          "loss_first": metrics[0]["loss"], "loss_last": metrics[-1]["loss"]}
    table = Table(title=f"largest relative difference to 1 rank over {args.steps} steps (fp32, CPU ranks)")
    for column in ("layout", "ranks", *KEYS, "loss first -> last", "wall s"):
        table.add_column(column, justify="right")
    for name, row in rows.items():
        table.add_row(name, str(row["ranks"]), *(f"{row['max_rel_diff'][k]:.1e}" for k in KEYS),
                      f"{row['loss_first']:.4f} -> {row['loss_last']:.4f}", f"{row['wall_s']:.0f}")
    Console(width=160).print(table)
    out = ROOT / "benchmarks/results/layout_parity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "reference_wall_s": ref_wall, "layouts": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
