"""The one base class of a user's mistake, and the errors that derive from it.

A `UserError` is bad input or a failed step the user can fix: `str()` is the one line shown, and the `moe` command
line (`moe_model.cli.main`, the only place that catches it) prints it on stderr and exits 2, with no traceback.
`RecipeError` (a recipe field, moe_model.recipe), `ReportError`, `ExportError` and the ones below all derive from it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: `str()` is the one line shown, exit code 2."""


class UsageError(UserError):
    """Bad input that is not a recipe field (a path, a flag)."""


class LaunchError(UserError):
    """A subprocess the project started (the deepspeed launcher, a rank program) failed; `str()` says which and
    quotes its last words."""


class MetricsError(UserError):
    """A metrics.jsonl that cannot be read (a bad line that is not a torn last one)."""
