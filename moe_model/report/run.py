"""PNGs of a training run from its metrics.jsonl (`moe report RUN_DIR [-o OUT_DIR]`).

Writes `loss.png` (train and validation loss, aux loss) and `expert_load.png` (layers x experts and layers x steps)
to OUT_DIR (default RUN_DIR/report). A bad run folder is a ReportError (one line; the CLI exits 2), with nothing
written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..metrics_file import read_metrics


class ReportError(UserError):
    """A run folder that cannot be reported on; `str()` is the one line shown."""


def load_run(run_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """(metrics lines, run name) of a run folder; ReportError when it is not one (MetricsError for a bad line)."""
    if not run_dir.is_dir():
        raise ReportError(f"{str(run_dir)!r} is not a folder; pass the output_dir of a training run, "
                          "e.g. runs/tiny-cpu")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{str(run_dir)!r} has no metrics.jsonl; pass the output_dir of a training run that logged "
                          "at least one step")
    metrics = read_metrics(path)
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
    """Write the run's PNGs to `out_dir` (default RUN_DIR/report); their paths."""
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
