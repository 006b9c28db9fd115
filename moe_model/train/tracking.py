"""Where metrics go: `OUTPUT_DIR/metrics.jsonl` (appended across resumes) and wandb, both from global rank 0."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..recipe import Recipe


class Tracker:
    def __init__(self, recipe: Recipe, run_config: dict[str, Any], enabled: bool):
        self.enabled = enabled
        self.path = recipe.output_dir / "metrics.jsonl"
        self.run = None
        if not enabled:
            return
        mode = os.environ.get("WANDB_MODE") or recipe.tracking.wandb.mode
        if mode != "disabled":
            import wandb

            w = recipe.tracking.wandb
            self.run = wandb.init(project=w.project, entity=w.entity, group=w.group, name=recipe.name, mode=mode,
                                  dir=str(recipe.output_dir), config=run_config)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if not isinstance(v, list)}, step=metrics["step"])

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
