"""`moe export RUN_DIR OUT_DIR [--format native|mixtral|qwen3_moe|qwen2_moe|olmoe|glm4_moe|hub] [--tag TAG]`: a
run's checkpoint as a Hugging Face folder (train/export.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the output_dir of a training run")
    parser.add_argument("out_dir", help="the folder to create")
    from ..formats import EXPORT_FORMATS

    parser.add_argument("--format", choices=EXPORT_FORMATS, default="native",
                        help="native: MoEForCausalLM; mixtral: transformers' MixtralForCausalLM (silu experts only); "
                             "qwen3_moe, qwen2_moe, olmoe, glm4_moe: that family's transformers class; hub: the format "
                             "of the run's train.init_from folder")
    parser.add_argument("--tag", default=None, help="a checkpoint tag (default: the newest one that verifies)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_export(args: argparse.Namespace) -> int:
    import sys

    from ..train.export import export

    skipped: list[str] = []
    done = export(Path(args.run_dir), Path(args.out_dir), args.format, args.tag, skipped=skipped)
    for note in skipped:  # newer checkpoints that do not verify or vanished while read, each with its reason
        print(f"moe export: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps({"exported": str(done.folder), "format": done.format, "step": done.step,
                          "checkpoint": str(done.checkpoint), "skipped": skipped}, indent=2))
    else:
        print(f"wrote {done.folder} ({done.format}) from step {done.step} ({done.checkpoint.name}); load it with "
              f"AutoModelForCausalLM.from_pretrained({str(done.folder)!r}"
              + (", trust_remote_code=True)" if done.format == "native" else ")"))
    return 0
