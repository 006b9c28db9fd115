"""The one reader of a run's `metrics.jsonl` (one JSON object per logged step, each with `step`; appended by
`train.tracking.Tracker` on global rank 0 and across resumes).

Policy for a bad line, the same for every reader (`moe report`, `moe calibrate --from`, a resume's trim, tests):
- blank lines are skipped;
- a LAST line without its closing newline that is not a JSON object is a write torn by a crash (the run was killed
  mid-line): it is skipped, the steps before it stand;
- any other line that is not a JSON object with a `step` is a `MetricsError` naming the file and the line number.
On a good file the records come back as written, in order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import MetricsError


def read_metrics_lines(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(line text without its newline, parsed record) of every metrics line of `path`, under the module's policy."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"{str(path)!r} does not exist; pass the output_dir of a training run")
    text = path.read_text()
    lines = text.splitlines()
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        torn = number == len(lines) and not text.endswith("\n")
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if torn:
                continue
            raise MetricsError(f"{path} line {number} is not JSON; remove or repair that line") from None
        if not isinstance(record, dict) or "step" not in record:
            if torn:
                continue
            raise MetricsError(f"{path} line {number} has no 'step'; it is not a metrics line")
        out.append((line, record))
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every metrics record of the file `path` (not a run folder), in order; see the module for bad lines."""
    return [record for _, record in read_metrics_lines(path)]
