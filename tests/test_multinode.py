"""Several nodes, emulated on this machine with CPU ranks: two "nodes" of 2 ranks each started as a cluster starts
them, each training a pp2 x dp2 x ep2 layout of tests/layouts.py, killed (SIGKILL to every process) after a
checkpoint, and resumed.

- hostfile: `moe train --hostfile H --node-rank K --master-addr 127.0.0.1 --master-port P` once per node (DeepSpeed's
  own launcher, `--no_ssh --node_rank K`: what every node of a pdsh-less cluster runs);
- srun: 4 processes of `python -m moe_model.train.main` with only SLURM's variables (SLURM_PROCID, SLURM_LOCALID,
  SLURM_NTASKS, SLURM_JOB_NODELIST, ...), as `srun` starts them: no RANK, WORLD_SIZE or MASTER_ADDR.

Each run's losses equal the 1-rank run's (1e-4, the parity bound) and, after the kill and the resume, the
uninterrupted run of the same layout (1e-6: the resume is exact). A run whose nodes see different output folders
(here: each "node" in its own working directory, with a relative train.output_dir) is refused before any step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_model.launch import free_port
from moe_model.train.tracking import read_metrics
from moe_model.train import checkpoint, cluster
from tests.launch import ROOT
from tests.layouts import LAYOUTS, STEPS

RECIPE = str(ROOT / "recipes/tiny_cpu.yaml")
SAVE = ("train.save_every=2",)
MOE = str(Path(sys.executable).parent / "moe")


def quiet_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_SIZE", "CROSS_SIZE")}
    return {**env, "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "DS_ACCELERATOR": "cpu", **extra}


def start(commands: list[tuple[list[str], dict[str, str], Path]], logs: Path) -> list[subprocess.Popen]:
    """Each (command, env, cwd) in a session of its own, its output in logs/<i>.log."""
    logs.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen(command, env=env, cwd=cwd, stdout=open(logs / f"{i}.log", "w"), stderr=subprocess.STDOUT,
                             start_new_session=True) for i, (command, env, cwd) in enumerate(commands)]


def wait_all(processes: list[subprocess.Popen], timeout: float = 400) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in processes:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            kill(processes)
            raise
    return codes


def kill(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in processes:
        p.wait()


def logs_of(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(folder.glob("*.log")))


def kill_after_step(processes: list[subprocess.Popen], out: Path, step: int, timeout: float = 300) -> None:
    """SIGKILL every process once `step` is logged (its checkpoint at step - 1 is then complete or being signed)."""
    metrics, deadline = out / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and not (metrics.exists() and f'"step": {step}' in metrics.read_text()):
        if any(p.poll() is not None for p in processes):
            break
        time.sleep(0.1)
    kill(processes)


def check_losses(out: Path, single_rank, uninterrupted: Path) -> None:
    resumed, alone, whole = read_metrics(out), single_rank(), read_metrics(uninterrupted)
    assert [m["step"] for m in resumed] == list(range(1, 8))
    for one, many, same in zip(alone, resumed, whole):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert abs(one[key] - many[key]) <= 1e-4 * abs(one[key]), ("1 rank", one["step"], key, one[key], many[key])
            assert abs(same[key] - many[key]) <= 1e-6 * abs(same[key]), ("resume", same["step"], key, same[key],
                                                                         many[key])


def hostfile_commands(tmp_path: Path, overrides: tuple[str, ...], port: int) -> list:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    sets = [word for o in overrides for word in ("--set", o)]
    return [([MOE, "train", RECIPE, "--hostfile", str(hostfile), "--node-rank", str(node), "--master-addr",
              "127.0.0.1", "--master-port", str(port), *sets], quiet_env(), ROOT) for node in (0, 1)]


def kill_and_resume(tmp_path: Path, name: str, commands, single_rank, layout_run) -> None:
    """Train layout `name` (tests/layouts.py) with checkpoints through `commands(overrides)` (the (command, env,
    cwd) of every process a cluster starts), SIGKILL every process after step 5, start them again, and hold the
    losses to the 1-rank run's and to the uninterrupted run's."""
    _, *layout = LAYOUTS[name]
    out = tmp_path / "run"
    overrides = (*layout, *STEPS, *SAVE, f"train.output_dir={out}")
    processes = start(commands(overrides), tmp_path / "first")
    kill_after_step(processes, out, 5)
    newest = checkpoint.newest(out / "checkpoints")
    assert newest is not None and len(read_metrics(out)) < 7, logs_of(tmp_path / "first")
    processes = start(commands(overrides), tmp_path / "second")
    assert set(wait_all(processes)) == {0}, logs_of(tmp_path / "second")
    said = (tmp_path / "second" / "0.log").read_text()
    assert f"resuming from {newest}" in said, said[-3000:]
    check_losses(out, single_rank, layout_run(name))


@pytest.mark.multirank
def test_two_nodes_from_a_hostfile_train_like_one_rank_and_resume_exactly(tmp_path, single_rank, layout_run):
    kill_and_resume(tmp_path, "pp2_dp2_ep2_zero1_ckpt_autoep",
                    lambda overrides: hostfile_commands(tmp_path, overrides, free_port()), single_rank, layout_run)


def srun_tasks(overrides: tuple[str, ...], job: int, cwds: tuple[Path, Path] = (ROOT, ROOT)) -> list:
    """What `srun --nodes 2 --ntasks-per-node 2 python -m moe_model.train.main ...` starts: 4 tasks, SLURM_* only."""
    sets = [word for o in overrides for word in ("--set", o)]
    command = [sys.executable, "-m", "moe_model.train.main", "--recipe", RECIPE, *sets]
    tasks = []
    for rank in range(4):
        slurm = {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % 2), "SLURM_NODEID": str(rank // 2),
                 "SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "2(x2)",
                 "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_JOB_ID": str(job)}
        tasks.append((command, quiet_env(PYTHONPATH=str(ROOT), **slurm), cwds[rank // 2]))
    return tasks


def free_slurm_job_id() -> int:
    """A job id whose port (`cluster.adopt_slurm`'s rule) nothing listens on now."""
    import socket

    for job in range(os.getpid() % cluster.SLURM_PORT_SPAN, 10**6, 7919):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", cluster.SLURM_PORT_BASE + job % cluster.SLURM_PORT_SPAN))
                return job
            except OSError:
                continue
    raise RuntimeError("no free port for an emulated SLURM job")


@pytest.mark.multirank
def test_srun_tasks_train_like_one_rank_and_resume_exactly(tmp_path, single_rank, layout_run):
    kill_and_resume(tmp_path, "pp2_dp2_ep2_zero0_legacy",
                    lambda overrides: srun_tasks(overrides, free_slurm_job_id()), single_rank, layout_run)


@pytest.mark.multirank
def test_nodes_that_see_different_output_folders_are_refused_before_any_step(tmp_path):
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir(), node1.mkdir()
    _, *layout = LAYOUTS["pp2_dp2_ep2_zero0_legacy"]
    overrides = (*layout, *STEPS, "train.output_dir=run")  # relative: each node's own working directory
    processes = start(srun_tasks(overrides, free_slurm_job_id(), cwds=(node0, node1)), tmp_path / "logs")
    assert wait_all(processes, timeout=300) == [2, 2, 2, 2], logs_of(tmp_path / "logs")
    lines = [line for line in (tmp_path / "logs" / "0.log").read_text().splitlines() if line.startswith("moe:")]
    assert len(lines) == 1 and "is not one folder on every node" in lines[0] and "(ranks 2, 3)" in lines[0], lines
    for node in (node0, node1):  # nothing trained, nothing written but the empty folder and rank 0's lock
        assert not (node / "run" / "metrics.jsonl").exists() and not (node / "run" / "checkpoints").exists()
