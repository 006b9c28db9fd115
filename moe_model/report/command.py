"""`moe report RUN_DIR [-o OUT_DIR] [--json]`: PNGs of a training run from its metrics.jsonl.

Writes `loss.png` (train and validation loss, aux loss) and `expert_load.png` (layers x experts and layers x steps)
to OUT_DIR (default RUN_DIR/report). A bad run folder is one line on stderr and exit code 2, with nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


class ReportError(Exception):
    """A run folder that cannot be reported on; `str()` is the one line shown."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the output_dir of a training run (holds metrics.jsonl)")
    parser.add_argument("-o", "--output", default=None, help="folder for the PNGs (default: RUN_DIR/report)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def load_run(run_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """(metrics lines, run name) of a run folder; ReportError when it is not one."""
    if not run_dir.is_dir():
        raise ReportError(f"{str(run_dir)!r} is not a folder; pass the output_dir of a training run, "
                          "e.g. runs/tiny-cpu")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{str(run_dir)!r} has no metrics.jsonl; pass the output_dir of a training run that logged "
                          "at least one step")
    metrics = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ReportError(f"{path} line {number} is not JSON; remove or repair that line") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ReportError(f"{path} line {number} has no 'step'; it is not a metrics line")
        metrics.append(record)
    if not any("loss" in m for m in metrics):
        raise ReportError(f"{path} holds no logged loss yet; report after the first logged step")
    name = run_dir.resolve().name
    run_json = run_dir / "run.json"
    if run_json.is_file():
        try:
            name = json.loads(run_json.read_text())["recipe"]["name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return metrics, name


def report(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    from .plots import plot_expert_load, plot_losses

    metrics, name = load_run(run_dir)
    out_dir = out_dir or run_dir / "report"
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"-o {out_dir}: is a file, not a folder; choose another")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_losses(metrics, out_dir / "loss.png", title=f"{name}: loss")]
    if any(m.get("expert_load_max_over_mean_per_layer") for m in metrics):
        written.append(plot_expert_load(metrics, out_dir / "expert_load.png", title=f"{name}: expert load"))
    return written


def cmd_report(args: argparse.Namespace) -> int:
    """The `moe report` entry: a run folder, not a recipe, is its input."""
    try:
        written = report(Path(args.run_dir), Path(args.output) if args.output else None)
    except (ReportError, OSError) as err:
        print(f"moe report: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"pngs": [str(p) for p in written]}, indent=2))
    else:
        for path in written:
            print(f"wrote {path}")
    return 0
