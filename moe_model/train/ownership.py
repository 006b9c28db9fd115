"""A run owns its output directory: one run at a time, and never two runs' files mixed.

- `OutputLock`: an advisory `fcntl.flock` on `OUTPUT_DIR/run.lock`, taken by global rank 0 of a run (the one process
  that writes run.json, metrics.jsonl and the manifests) before the run writes anything, held until that process
  ends. The kernel drops the lock when the process dies however it dies, so a SIGKILLed run never blocks its own
  resume; the file itself stays (deleting it would let a third run lock a fresh file while a second still holds the
  old one). The holder writes its pid, host and start time into the file, for the line that refuses a second run.
  The other ranks of a run take no lock (they would refuse each other); `main.main` tells them rank 0's verdict.
  Both `moe train` and a direct `deepspeed ... scripts/train.py` land in `main.main`, so both are covered.
  A file system that refuses flock (some parallel and network ones: ENOLCK, EOPNOTSUPP) gets an exclusively created
  `run.lock.held` instead (`OutputLock._acquire_by_creation`), which the run removes as it ends.
- `write_node_token` / `not_shared_verdict`: whether OUTPUT_DIR is one folder on every node (rank 0 writes a token,
  every rank reads it back), checked by `main.claim_output_dir` before any step.
- `previous_run`: what of an earlier run the directory holds (metrics.jsonl with lines, checkpoint folders), and
  `archive_previous_run`, which moves exactly those into `OUTPUT_DIR/archive-<UTC time>/` (`train.overwrite`, or
  `resume: auto` with no checkpoint to continue from): nothing is deleted and nothing is appended to another run's
  metrics.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "run.lock"
ARCHIVE_PREFIX = "archive-"
# what an earlier run leaves in OUTPUT_DIR (the tokenizer and the token cache are reused, not a run's own)
RUN_FILES = ("metrics.jsonl", "run.json", "checkpoints", "wandb", "wandb_run_id")


class OutputLock:
    """`OutputLock(output_dir).acquire()` -> None once held by this process, else the line that names the holder."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.file = None
        self.held: Path | None = None  # the exclusive-creation lock, where flock is refused

    def acquire(self) -> str | None:
        try:
            f = open(self.path, "a+")
        except OSError as err:
            return f"cannot open {self.path} ({err.strerror}); choose another train.output_dir"
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            return (f"{self.path.parent} is in use by another run ({describe_holder(holder)}); wait for it to end, "
                    "stop it, or choose another train.output_dir")
        except OSError as err:  # ENOLCK, EOPNOTSUPP, EINVAL: a parallel or network file system that refuses flock
            f.close()
            return self._acquire_by_creation(err)
        f.seek(0)
        f.truncate()
        f.write(holder_record())
        f.flush()
        self.file = f  # held while this object (kept by the caller) and the process live
        return None

    def _acquire_by_creation(self, flock_error: OSError) -> str | None:
        """Where flock is refused: exclusive creation of `run.lock.held` (O_CREAT | O_EXCL is
        atomic on NFS v3+, Lustre and GPFS), holding this process's pid and host. A holder of this host whose pid
        is gone left it (SIGKILL): taken over. One on another host cannot be checked from here: refused, naming it,
        with the `rm` to use once that run is known to be gone. Released (the file removed) by `release`."""
        held = self.path.with_name(self.path.name + ".held")
        for _ in range(2):
            try:
                fd = os.open(held, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(held.read_text())
                except (OSError, ValueError):
                    holder = {}
                if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
                    held.unlink(missing_ok=True)  # left by a killed run of this host
                    continue
                return (f"{self.path.parent} is in use by another run ({describe_holder(json.dumps(holder))}; this "
                        f"file system refuses flock ({flock_error.strerror}), so the lock is the file {held}); wait "
                        f"for it to end, or once it is gone: rm {held}")
            except OSError as err:
                return f"cannot create {held} ({err.strerror}); choose another train.output_dir"
            with os.fdopen(fd, "w") as f:
                f.write(holder_record())
            self.held = held
            return None
        return f"cannot take {held}: another process keeps creating it; choose another train.output_dir"

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the last descriptor drops the flock
            self.file = None
        if self.held is not None:
            self.held.unlink(missing_ok=True)
            self.held = None


def remove_if_unused(output_dir: Path) -> bool:
    """Remove OUTPUT_DIR, which this launch created, where the run was refused before writing anything of its own:
    it holds only what a launch writes before any rank trains (the lock, where flock is refused its created file,
    the node check's token, the pdsh launch's environment file), so a refusal leaves nothing on disk that was not
    there before. Returns whether it was removed; a folder holding anything else is kept whole."""
    from .cluster import ENV_FILE

    launch_files = {LOCK_FILE, LOCK_FILE + ".held", NODE_TOKEN, ENV_FILE}
    output_dir = Path(output_dir)
    try:
        names = {p.name for p in output_dir.iterdir()}
    except OSError:
        return False
    if not names <= launch_files:
        return False
    for name in names:
        (output_dir / name).unlink(missing_ok=True)
    try:
        output_dir.rmdir()
    except OSError:  # something appeared meanwhile (another run's lock): it stays
        return False
    return True


def _alive(pid) -> bool:
    """Whether a process of this host has this pid (a zombie counts as alive: it still holds its files)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_record() -> str:
    """What a lock's holder writes into it: this process's pid, host and start time, one JSON line."""
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n"


def describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"


def previous_run(output_dir: Path) -> list[str]:
    """The names of what an earlier run left in `output_dir` that a new run would mix with: metrics.jsonl with
    content, checkpoint folders. Empty: nothing to mix."""
    output_dir = Path(output_dir)
    found = []
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    checkpoints = output_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.glob("step*")):
        found.append("checkpoints/")
    return found


def archive_previous_run(output_dir: Path) -> Path | None:
    """Move an earlier run's files (`RUN_FILES` present) into `output_dir/archive-<UTC time>/`. Returns that folder,
    or None when there was nothing to move."""
    output_dir = Path(output_dir)
    present = [output_dir / name for name in RUN_FILES if (output_dir / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    archive = output_dir / f"{ARCHIVE_PREFIX}{stamp}"
    suffix = 1
    while archive.exists():
        archive, suffix = output_dir / f"{ARCHIVE_PREFIX}{stamp}-{suffix}", suffix + 1
    archive.mkdir()
    for path in present:
        os.replace(path, archive / path.name)  # a rename on one file system: whole or not at all
    return archive


NODE_TOKEN = ".node-check"  # written by rank 0, read by every rank, removed: is this one folder for every node?


def write_node_token(output_dir) -> str:
    """Write a token no other run could have written into OUTPUT_DIR (global rank 0); returns it."""
    token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
    (output_dir / NODE_TOKEN).write_text(token)
    return token


def not_shared_verdict(output_dir, token: str) -> str | None:
    """Every rank reads rank 0's token in its own OUTPUT_DIR (a collective). None where all see it; else the line
    that refuses the run, naming the hosts that do not. The checkpoints, metrics and data cache are written by some
    ranks and read by others (rank 0 writes the manifests of every rank's files, one rank builds the data), so a
    folder of each node's own would fail later, at the first save or resume, with files rank 0 cannot see."""
    import torch.distributed as dist

    try:
        sees = (output_dir / NODE_TOKEN).read_text() == token
    except OSError:
        sees = False
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), sees))
    blind: dict[str, list[int]] = {}
    for r, (host, seen) in enumerate(everyone):
        if not seen:
            blind.setdefault(host, []).append(r)
    if not blind:
        return None
    where = "; ".join(f"{host} (ranks {', '.join(map(str, ranks))})" for host, ranks in blind.items())
    return (f"moe: recipe error: train.output_dir: {output_dir} is not one folder on every node: rank 0's files there "
            f"are not seen from {where}; put it on a file system that every node mounts at the same path "
            "(checkpoints, metrics and the data cache are shared between the ranks)")
