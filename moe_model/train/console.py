"""What a training run shows on the console: one header, the progress bar, the summary, and the lines that matter.

By default DeepSpeed's chatter stays out of the way (a 5-step 4-rank run printed 93 lines, most of them DeepSpeed's
and wandb's). Where each line came from, and what keeps it quiet:
- the `deepspeed` launcher's runner and its per-node `launch.py` log at INFO (the command, world info, "process N
  spawned", "exits successfully") and echoes the rank command line after a non-zero exit: `moe train` passes
  `--log_level` (`launcher_log_args`);
- "Setting accelerator to CPU" (WARNING, once per process, from DeepSpeed's accelerator detection): `moe train` detects
  the accelerator once and hands it to every process as `DS_ACCELERATOR` (`distributed.launch_env`); on the ranks a
  logging filter drops it, so a user calling the deepspeed launcher directly does not see it either;
- bare `print`s inside DeepSpeed while the process group and the engine are built ("deepspeed_shm_comm_op built
  successfully", "Using topology", "SEED_LAYERS", the pipeline's stage listing, "No existing process group found"):
  DeepSpeed has no switch for them, so `library_output` captures them (and shows them again should the block fail);
- wandb's own banner and run summary: wandb's `silent` setting (`tracking.Tracker`).

`MOE_VERBOSE=1` (`moe train --verbose` sets it for the ranks) keeps every library line. Errors and warnings that are
not on the list above always show: the filter drops only DeepSpeed's INFO and the warnings named in `NOISE`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from ..recipe import Recipe

VERBOSE_ENV = "MOE_VERBOSE"
# DeepSpeed warnings that say nothing the user can act on: the accelerator detection on a machine without a GPU, and
# the scheduler's warning when the first step's learning rate is read before the first optimizer step
NOISE = ("Setting accelerator to CPU", "Attempting to get learning rate from scheduler before it has started")


def verbose() -> bool:
    """Whether the library logs stay on: MOE_VERBOSE=1 in this process's environment."""
    return os.environ.get(VERBOSE_ENV, "") == "1"


def launcher_log_args(verbose_: bool) -> list[str]:
    """The deepspeed launcher's own options for its log level: its default, info, prints the command, the world
    info and every rank's start and end, and its one warning says that there is no hostfile (a run on this
    machine). Its one error is launch.py's echo of the whole rank command line after a rank's non-zero exit
    ("... exits with return code = 2"), which follows every stop the ranks have already explained in one line
    (a refusal, 74, 75, a dead peer): critical drops it, and a rank that fails without such a line prints its own
    traceback. `--verbose` (or MOE_VERBOSE=1 here) keeps the default."""
    return [] if verbose_ or verbose() else ["--log_level", "critical"]


class _DropChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        return record.levelno > logging.WARNING or not any(text in record.getMessage() for text in NOISE)


def quiet_libraries() -> None:
    """Unless MOE_VERBOSE=1: DeepSpeed's logger keeps warnings and errors except `NOISE`. Call it before DeepSpeed is
    imported: its accelerator detection logs at import time (the filter sits on the logger DeepSpeed creates later
    under the same name)."""
    if verbose():
        return
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropChatter) for f in logger.filters):
        logger.addFilter(_DropChatter())


@contextlib.contextmanager
def library_output() -> Iterator[None]:
    """Capture what library code prints on stdout inside the block (DeepSpeed's bare prints while it builds the
    process group and the engine), unless MOE_VERBOSE=1. Should the block raise, the captured text is shown on
    stderr first, so nothing that explains a failure is lost."""
    if verbose():
        yield
        return
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise


def header(recipe: Recipe, run_config: dict[str, Any], wandb_where: str | None, warning: str | None = None) -> str:
    """The layout on its device (run_config's `device`, `device.Device.as_json`: the card's name, or CPU ranks on
    gloo) and the memory estimate's verdict; `warning` on a line of its own (the trainer's
    `device.peak_tflops_warning`: a default `hardware.peak_tflops` that does not match the card); then where the
    metrics go."""
    lay, device = run_config["layout"], run_config["device"]
    ranks = (f"{lay['world_size']} {device['name']}" if device["kind"] == "cpu"
             else f"{lay['world_size']} rank(s) on {device['name']}")
    line = (f"moe: {recipe.name}: {ranks}, tp{lay['tp']} pp{lay['pp']} "
            f"ep{lay['ep']} dp{lay['dp']}, experts on {lay.get('moe_backend', 'legacy')}, "
            f"ZeRO-{recipe.parallel.zero_stage}, {recipe.train.precision}, "
            f"{recipe.train.steps} steps")
    estimate = run_config.get("estimate", {})
    if "fits" in estimate:
        peak, budget = estimate["peak_rank"]["total_bytes"] / 1e9, estimate["budget_bytes"] / 1e9
        line += (f"; estimate: peak rank {peak:.2f} GB of {budget:.0f} GB, "
                 f"{'fits' if estimate['fits'] else 'DOES NOT FIT'}")
    lines = [line, warning] if warning else [line]
    where = f"moe: metrics: {recipe.output_dir / 'metrics.jsonl'}"
    if wandb_where:
        where += f"; wandb: {wandb_where}"
    return "\n".join([*lines, where])


def print_summary(recipe: Recipe, history: list[dict[str, Any]], wall_s: float, layout: dict[str, int]) -> None:
    """The closing table (first and last step) and the validation losses."""
    from rich.console import Console
    from rich.table import Table

    train = [m for m in history if "loss" in m]
    first, last = train[0], train[-1]
    table = Table(title=f"{recipe.name}: {len(train)} steps, {layout['world_size']} rank(s), "
                        f"tp{layout['tp']} pp{layout['pp']} dp{layout['dp']} ep{layout['ep']}")
    for column in ("", "first step", "last step"):
        table.add_column(column, justify="right")
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "tokens_per_s", "expert_load_max_over_mean"):
        table.add_row(key, *(f"{m[key]:.4f}" if m.get(key) is not None else "-" for m in (first, last)))
    console = Console()
    console.print(table)
    drop = 100 * (1 - last["loss"] / first["loss"])
    console.print(f"loss fell {drop:.1f}% in {wall_s:.1f} s; metrics: {recipe.output_dir / 'metrics.jsonl'}")
    evals = [m for m in history if "val_loss" in m]
    if evals:
        console.print("validation loss: " + ", ".join(f"{m['val_loss']:.4f} (step {m['step']})" for m in evals))
