"""`moe config RECIPE [-o PATH]`: the DeepSpeed JSON config the recipe generates (train/ds_config.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from ..errors import UsageError
from ..recipe import Recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", help="write to this file instead of stdout")


def write_whole(out: Path, text: str, flag: str) -> None:
    """`text` into the file `out`, whole or not at all: written beside it under a temporary name, then renamed over
    it. A path that is a folder, in a missing folder, or not writable is a UsageError naming `flag` and the fix, and
    leaves nothing behind (the temporary file is removed)."""
    if out.is_dir():
        raise UsageError(f"{flag} {out}: is a folder; name a file in it, e.g. {flag} {out / 'ds_config.json'}")
    if not out.parent.is_dir():
        raise UsageError(f"{flag} {out}: folder {str(out.parent)!r} does not exist; create it first")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(out)  # never a half-written file
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise UsageError(f"{flag} {out}: cannot write it ({err.strerror}); choose a path you can write") from None


def cmd_config(recipe: Recipe, args: argparse.Namespace) -> int:
    from ..train.ds_config import deepspeed_config

    text = json.dumps(deepspeed_config(recipe), indent=2) + "\n"
    if args.output:
        write_whole(Path(args.output), text, "-o")
    else:
        sys.stdout.write(text)
    return 0
