"""Which rank is gone when a collective fails: a rank killed (`kill -9`, the kernel's out-of-memory killer) or
crashed leaves its peers' next collective failing with the transport's words (gloo: "Connection reset by peer",
about 40 lines of traceback), none of which names the rank. So every rank's host and pid are gathered once, right
after the process group starts (`record`), and on a failure a rank looks up which ranks of its own host have exited
(`gone`); the lowest living rank of each host says so in one line (`reports`, the line: `main.peer_lost_line`).

A rank of another host cannot be looked up from here: a failure whose words are a lost connection (`lost_connection`)
with no rank of this host gone is a rank of another node.

Why by hand: torch.distributed reports a dead peer as the transport's error on the survivors, and DeepSpeed's
launch.py as the dead rank's return code with its whole command line; neither names the rank.
"""

from __future__ import annotations

import os
import socket
import time

PEER_LOST = 69  # EX_UNAVAILABLE: a rank of the run is gone; the line names it; resume once it is back
_ranks: list[tuple[str, int]] = []  # (host, pid) of every rank, by global rank
# the transports' words for a peer that went away (gloo's pair.cc, NCCL's remote-error reports)
LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited",
        "Connection refused", "NCCL communicator was aborted")


def record() -> None:
    """Every rank (a collective, once the process group exists): learn every rank's host and pid."""
    import torch.distributed as dist

    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), os.getpid()))
    _ranks[:] = [tuple(entry) for entry in everyone]


def gone(wait_s: float = 3.0) -> list[tuple[int, int]]:
    """(rank, pid) of every rank of this host whose process has exited (a zombie its launcher has not reaped yet
    counts), waiting up to `wait_s` for the kernel to finish a kill whose first effect, a closed socket, this rank
    has already seen."""
    import psutil

    host, me = socket.gethostname(), os.getpid()
    mine = [(rank, pid) for rank, (h, pid) in enumerate(_ranks) if h == host and pid != me]
    deadline = time.monotonic() + wait_s
    while True:
        dead = [(rank, pid) for rank, pid in mine if not _running(psutil, pid)]
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.1)


def _running(psutil, pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def reports(dead: list[tuple[int, int]]) -> bool:
    """Whether this rank prints the line: the lowest living rank of its host (one line a host)."""
    host, me = socket.gethostname(), os.getpid()
    gone_pids = {pid for _, pid in dead}
    living = [pid for h, pid in _ranks if h == host and pid not in gone_pids]
    return not living or living[0] == me


def lost_connection(err: BaseException | None) -> str | None:
    """The transport's words in `err` (or what it was raised from) for a peer that went away, or None."""
    while err is not None:
        words = next((w for w in LOST if w in str(err)), None)
        if words:
            return words
        err = err.__cause__ or err.__context__
    return None


def known() -> bool:
    """Whether `record` ran (a failure before the process group and the record is no peer's)."""
    return len(_ranks) > 1
