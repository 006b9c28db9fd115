"""Named accelerator classes: the figures `hardware.gpu: NAME` fills in where a recipe leaves them out.

Each class states its datasheet figures (dense bf16 peak, HBM bandwidth and size, the node's links) and the figures
the GEMM-by-shape time (`estimate.kernels`) needs: how many tiles run at once (`sm_count`, one output tile per
streaming multiprocessor), the output tile a large bf16 GEMM runs (`gemm_tile`), the depth K at which a tile's main
loop reaches half its rate (`gemm_k_half`: the prologue and epilogue a tile pays whatever K is), the fixed cost of
one kernel (`kernel_launch_us`: PyTorch's eager dispatch and the launch, the floor of any kernel's time) and the
fraction of the dense peak the fused attention reaches over forward and backward (`attention_efficiency`).
`hardware.mfu` stays the recipe's: the efficiency of a large, well-shaped GEMM, below which the shape terms reduce it.

Sources: NVIDIA's H100 and H200 SXM datasheets (989 TFLOPS dense bf16; 3.35 and 4.8 TB/s; 80 and 141 GB; NVLink 4
at 900 GB/s both directions, 450 each way), the A100 SXM datasheet (312 TFLOPS, 2.04 TB/s, 108 SMs, NVLink 3 at
300 GB/s each way), the H800 SXM (the H100's compute, NVLink cut to 400 GB/s both directions); the SM counts are
the architecture whitepapers' (132 on H100/H200 SXM5); CUTLASS's Hopper warp-specialised bf16 GEMMs use a 128 x 256
output tile with 64-deep K steps (Ampere's largest cuBLAS tiles are 256 x 128); the attention efficiency is
FlashAttention-2's (torch's SDPA flash backend) at head dim 128, causal, 4k tokens: about 330 TFLOPS forward and
less backward on H100 SXM5 (Shah et al. 2024, FlashAttention-3, figures of H100 forward/backward speed), about 0.3
of the peak over both; on A100 about 70% forward and 60% backward of 312 (Dao 2023, FlashAttention-2). The K depth
and the kernel cost are this project's stated assumptions (two K steps; 5 us per eager op, the launch latency
PyTorch's profiler shows for small kernels), to be replaced by `make gpu-check`'s measured table.
"""

from __future__ import annotations

from typing import Any

# the shape figures of a device with none stated: every GEMM at `hardware.mfu`, no kernel cost (the one-efficiency
# roofline this project used before the shape terms; a recipe that names no class keeps that meaning)
FLAT = {"sm_count": 0, "gemm_tile": (1, 1), "gemm_k_half": 0.0, "kernel_launch_us": 0.0, "attention_efficiency": None}

_HOPPER_SHAPES = {"sm_count": 132, "gemm_tile": (128, 256), "gemm_k_half": 128.0, "kernel_launch_us": 5.0,
                  "attention_efficiency": 0.3}

GPU_CLASSES: dict[str, dict[str, Any]] = {
    "h100_sxm": {"peak_tflops": 989.0, "hbm_bandwidth_tbps": 3.35, "gpu_memory_gb": 80.0, "gpus_per_node": 8,
                 "intra_node_gbps": 450.0, "inter_node_gbps": 50.0, **_HOPPER_SHAPES},
    "h200_sxm": {"peak_tflops": 989.0, "hbm_bandwidth_tbps": 4.8, "gpu_memory_gb": 141.0, "gpus_per_node": 8,
                 "intra_node_gbps": 450.0, "inter_node_gbps": 50.0, **_HOPPER_SHAPES},
    "h800_sxm": {"peak_tflops": 989.0, "hbm_bandwidth_tbps": 3.35, "gpu_memory_gb": 80.0, "gpus_per_node": 8,
                 "intra_node_gbps": 200.0, "inter_node_gbps": 50.0, **_HOPPER_SHAPES},
    "a100_sxm": {"peak_tflops": 312.0, "hbm_bandwidth_tbps": 2.04, "gpu_memory_gb": 80.0, "gpus_per_node": 8,
                 "intra_node_gbps": 300.0, "inter_node_gbps": 25.0, "sm_count": 108, "gemm_tile": (256, 128),
                 "gemm_k_half": 64.0, "kernel_launch_us": 5.0, "attention_efficiency": 0.65},
}


def class_defaults(name: str | None) -> dict[str, Any]:
    """The figures `hardware.gpu: name` fills in (None: the shape terms off, `FLAT`)."""
    return dict(FLAT) if name is None else {**FLAT, **GPU_CLASSES[name]}


def flat_overrides() -> list[str]:
    """`--set` lines that turn the GEMM-shape figures off (`FLAT`): the one-efficiency roofline, for comparisons."""
    return [f"hardware.{k}={'null' if v is None else list(v) if isinstance(v, tuple) else v}" for k, v in FLAT.items()]
