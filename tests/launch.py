"""Start real deepspeed ranks on CPU (gloo) for tests: a free port each, so test files can run side by side."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from moe_model.launch import deepspeed_command, free_port, rank_env
from tests.layouts import SINGLE_RANK  # re-exported: the tests' one-rank overrides

__all__ = ["ROOT", "SINGLE_RANK", "failure", "free_port", "launch"]

ROOT = Path(__file__).resolve().parents[1]


def launch(num_ranks: int, *overrides: str, script: str = "scripts/train.py", recipe: str = "recipes/tiny_cpu.yaml",
           extra_args: tuple[str, ...] = (), timeout: int = 400) -> subprocess.CompletedProcess:
    command = deepspeed_command(num_ranks, ROOT / script, ["--recipe", str(ROOT / recipe), *extra_args],
                                overrides=overrides)
    env = rank_env(WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), WANDB_SILENT="true")
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def failure(result: subprocess.CompletedProcess) -> str:
    return (result.stdout[-3000:] + "\n" + result.stderr[-3000:]).strip()
