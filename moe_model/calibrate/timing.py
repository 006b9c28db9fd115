"""Wall-clock timing shared by `moe calibrate` and its rank programs, and the copy bandwidth it measures with."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synced_median_seconds(device: str):
    """`median_seconds` for work on `device`: on CUDA each call waits for the queue (kernels run asynchronously)."""
    if device != "cuda":
        return median_seconds
    import torch

    def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
        def synced():
            fn()
            torch.cuda.synchronize()
        return median_seconds(synced, repeats, warmup)
    return timed


def measure_bandwidth_tbps(megabytes: int = 128, repeats: int = 5, device: str = "cpu") -> float:
    """2 x bytes per `copy_` of a `megabytes` buffer (read + write), median, in TB/s."""
    import torch

    a = torch.ones(megabytes * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / synced_median_seconds(device)(lambda: b.copy_(a), repeats) / 1e12
