"""Start real deepspeed ranks on CPU (gloo) for tests: a free port each, so test files can run side by side."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

from moe_model.launch import free_port, rank_env
from tests.layouts import SINGLE_RANK  # re-exported: the tests' one-rank overrides

__all__ = ["ROOT", "SINGLE_RANK", "failure", "free_port", "launch"]

ROOT = Path(__file__).resolve().parents[1]


def node_launch_command(num_ranks: int, program: Path, args: list[str], overrides: tuple[str, ...]) -> list[str]:
    """DeepSpeed's per-node launcher (`deepspeed.launcher.launch`) as the `deepspeed` runner starts it for one host
    (runner.py's local branch: world_info {"localhost": [0..n-1]}, 127.0.0.1, a free port, log level info). The
    runner in between imports torch and DeepSpeed only to build this line: 2.4 s of CPU per launch, about a minute
    of `make test`. The runner itself, `moe train` and the cluster paths are tested through `deepspeed_command`
    (tests/test_train_launcher.py, test_multinode.py, test_faults_run.py)."""
    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(num_ranks))}).encode()).decode()
    command = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--log_level=info", str(program), *args]
    for override in overrides:
        command += ["--set", override]
    return command


def launch(num_ranks: int, *overrides: str, script: str = "scripts/train.py", recipe: str = "recipes/tiny_cpu.yaml",
           extra_args: tuple[str, ...] = (), timeout: int = 400, preexec_fn=None) -> subprocess.CompletedProcess:
    """`preexec_fn`: run in the launcher's process before it starts (a resource limit the ranks inherit)."""
    command = node_launch_command(num_ranks, ROOT / script, ["--recipe", str(ROOT / recipe), *extra_args], overrides)
    env = rank_env(WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), WANDB_SILENT="true")
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
                          preexec_fn=preexec_fn)


def failure(result: subprocess.CompletedProcess) -> str:
    return (result.stdout[-3000:] + "\n" + result.stderr[-3000:]).strip()
