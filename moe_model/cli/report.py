"""`moe report RUN_DIR [-o OUT_DIR] [--json]`: a training run's PNGs (report/run.py); a run folder, not a recipe,
is its input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the output_dir of a training run (holds metrics.jsonl)")
    parser.add_argument("-o", "--output", default=None, help="folder for the PNGs (default: RUN_DIR/report)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_report(args: argparse.Namespace) -> int:
    from ..report.run import ReportError, report

    try:
        written = report(Path(args.run_dir), Path(args.output) if args.output else None)
    except OSError as err:  # a folder that cannot be written: the user's to fix, one line like any bad input
        raise ReportError(str(err)) from None
    if args.json:
        print(json.dumps({"pngs": [str(p) for p in written]}, indent=2))
    else:
        for path in written:
            print(f"wrote {path}")
    return 0
