"""Units and small integer helpers shared by the recipe checks, the estimator, the planner and the reports."""

from __future__ import annotations

FP32 = 4  # bytes of an fp32 element
GB = 1e9  # decimal gigabyte: what reports and `hardware.gpu_memory_gb` count in


def divisors(n: int) -> list[int]:
    """Every positive divisor of `n`, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]
