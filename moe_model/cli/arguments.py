"""Argument types the `moe` subcommands share, and the parser whose mistakes are one line."""

from __future__ import annotations

import argparse
from typing import Callable


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, except that a bad flag is one line (`moe plan: error: argument --top: ...; see moe plan
    -h`) and exit 2, instead of the usage block followed by the error: argparse offers no switch for that."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} -h\n")


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse `type`: an integer of at least `minimum` (argparse's `int` takes 0 and negatives)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    parse.__name__ = f"whole number >= {minimum}"
    return parse
