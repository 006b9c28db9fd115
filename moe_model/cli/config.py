"""`moe config RECIPE [-o PATH]`: the DeepSpeed JSON config the recipe generates (train/ds_config.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UsageError
from ..recipe import Recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", help="write to this file instead of stdout")


def cmd_config(recipe: Recipe, args: argparse.Namespace) -> int:
    from ..train.ds_config import deepspeed_config

    text = json.dumps(deepspeed_config(recipe), indent=2) + "\n"
    if args.output:
        out = Path(args.output)
        if not out.parent.is_dir():
            raise UsageError(f"-o {args.output}: folder {str(out.parent)!r} does not exist; create it first")
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)  # never a half-written config
    else:
        sys.stdout.write(text)
    return 0
