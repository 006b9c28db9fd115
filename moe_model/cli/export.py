"""`moe export RUN_DIR OUT_DIR [--format native|mixtral] [--tag TAG]`: a run's checkpoint as a Hugging Face folder
(train/export.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the output_dir of a training run")
    parser.add_argument("out_dir", help="the folder to create")
    parser.add_argument("--format", choices=("native", "mixtral"), default="native",
                        help="native: MoEForCausalLM; mixtral: transformers' MixtralForCausalLM (silu experts only)")
    parser.add_argument("--tag", default=None, help="a checkpoint tag (default: the newest one that verifies)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_export(args: argparse.Namespace) -> int:
    import sys

    from ..train.export import export

    skipped: list[str] = []
    out = export(Path(args.run_dir), Path(args.out_dir), args.format, args.tag, skipped=skipped)
    for note in skipped:  # newer checkpoints that do not verify, each with its reason
        print(f"moe export: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps({"exported": str(out), "format": args.format, "skipped": skipped}, indent=2))
    else:
        print(f"wrote {out} ({args.format}); load it with AutoModelForCausalLM.from_pretrained({str(out)!r}"
              + (", trust_remote_code=True)" if args.format == "native" else ")"))
    return 0
