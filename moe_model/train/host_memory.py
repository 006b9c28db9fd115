"""The host's available memory, for the launch guard on CPU ranks (estimate/guard.py `host_memory_refusal`).

CPU ranks (gloo) allocate from the host's RAM, so the recipe's `hardware.gpu_memory_gb` says nothing about whether
they fit: `moe train` (before launching) and every rank (direct use of the deepspeed launcher) also check the estimate
per rank x the ranks on this host against MemAvailable.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..recipe import Recipe


def available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Memory the host can give new allocations without swapping: psutil's `available` when psutil is installed,
    else MemAvailable from /proc/meminfo (Linux); None where neither says."""
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_host_refusal(recipe: Recipe, world_size: int | None, local_ranks: int | None = None,
                     accelerator: str | None = None) -> str | None:
    """On CPU ranks (`accelerator` "cpu"; None: DeepSpeed's detection): `host_memory_refusal`'s line when the
    `local_ranks` on this host (None: the launcher's LOCAL_SIZE, else `world_size`) do not fit its available memory,
    else None; always None on an accelerator with memory of its own, or where the host does not say. Inside a process
    group this is a collective (every rank must call it): each takes the smallest figure any rank read, so that all
    give one answer."""
    from .distributed import accelerator_name

    if (accelerator or accelerator_name()) != "cpu":
        return None
    if local_ranks is None:
        local_ranks = int(os.environ.get("LOCAL_SIZE", world_size or 1))
    available = available_bytes()
    import torch.distributed as dist

    if dist.is_initialized():
        import torch

        figure = torch.tensor([float(available if available is not None else -1)], dtype=torch.float64)
        dist.all_reduce(figure, op=dist.ReduceOp.MIN)  # CPU ranks: gloo reduces CPU tensors
        available = None if figure.item() < 0 else int(figure.item())
    if available is None:
        return None
    from ..estimate.guard import host_memory_refusal

    return host_memory_refusal(recipe, world_size, local_ranks, available)
