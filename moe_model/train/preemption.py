"""Preemption: a run asked to stop by SIGTERM or SIGUSR1 finishes its current step, writes a checkpoint and exits.

SIGTERM is what SLURM, Kubernetes and job managers send before their SIGKILL (SLURM's grace period is `KillWait`, 30 s
by default); SIGUSR1 is what `sbatch --signal=USR1@SECONDS` sends that many seconds ahead of the time limit, so a
save that needs longer than the grace period can be asked for early. Ctrl-C (SIGINT) still stops every rank at once.

A signal may reach one rank only (DeepSpeed's launch.py terminates its ranks one after the other), so the ranks
agree at the end of every step (`agreed`: a one-element MAX all-reduce): all stop after the same step, and all take
part in the checkpoint's collectives. A rank whose peer is gone cannot agree: its collective fails and it stops at
once with the interrupted run's line (`main.interrupted_line`).
"""

from __future__ import annotations

import signal

PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; launch again to continue (what a requeue does)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_requested: str | None = None


def install() -> None:
    for signum in SIGNALS:
        signal.signal(signum, _request)


def _request(signum: int, frame) -> None:
    """Record the first request; a second one (launch.py's terminate after the scheduler's own signal) changes
    nothing: the run is already stopping after this step."""
    global _requested
    if _requested is None:
        _requested = signal.Signals(signum).name


def requested() -> str | None:
    """The name of the signal that asked this rank to stop, or None."""
    return _requested


def agreed(device) -> bool:
    """Whether any rank was asked to stop (a collective: every rank calls it after the same steps)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([0 if _requested is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
