"""Facts about the device a run's ranks really use: its name, its memory, its known dense bf16 peak.

`this_device()` is read on the launch path only (the ranks, and `moe train` before it starts them), never by
`moe estimate`, which stays arithmetic and runs on a laptop. The device is CUDA only where DeepSpeed's accelerator
is "cuda" (`distributed.accelerator_name`: DS_ACCELERATOR, else DeepSpeed's detection), not wherever
`torch.cuda.is_available()` says so: a CPU run on a machine with a GPU is a CPU run.

On CUDA the card's memory is `torch.cuda.get_device_properties(i).total_memory` (cudaDeviceProp.totalGlobalMem), the
whole card: the estimate's total already counts what the CUDA context and communicators take outside PyTorch's
allocator (its `reserve_bytes`), so free memory (`mem_get_info`, which leaves out this process's own context) would
count that twice. `torch.cuda` gives the figure and the name; DeepSpeed's accelerator abstraction has the name
only for CUDA, so this reads torch directly.

Known peaks (`KNOWN_PEAK_TFLOPS`, the one table): dense bf16 tensor-core TFLOPS per GPU from NVIDIA's datasheets. The
datasheets print the 2:4-sparsity figure with an asterisk; the dense figure is half of it. The recipe's
`hardware.peak_tflops` stays what the run's MFU is logged against; the table only feeds the header's warning when
that figure is a default that does not match the card (`peak_tflops_warning`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..recipe import Recipe

CPU_NAME = "CPU ranks (gloo)"

# (substring of torch.cuda.get_device_name, dense bf16 TFLOPS, source). The first match wins, so a more specific
# name comes before the one it contains ("H100 PCIe" before "H100", "GH200" and "H200 NVL" before "H200").
KNOWN_PEAK_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H100 PCIe", 756.0, "NVIDIA H100 datasheet, H100 PCIe: BF16 1,513 TFLOPS with sparsity"),
    ("H100 NVL", 835.0, "NVIDIA H100 datasheet, H100 NVL: BF16 1,671 TFLOPS with sparsity"),
    ("H100", 989.0, "NVIDIA H100 datasheet, H100 SXM: BF16 1,979 TFLOPS with sparsity"),
    ("GH200", 989.0, "NVIDIA GH200 Grace Hopper datasheet: FP16/BF16 1,979 TFLOPS with sparsity"),
    ("H200 NVL", 835.0, "NVIDIA H200 datasheet, H200 NVL: BF16 1,671 TFLOPS with sparsity"),
    ("H200", 989.0, "NVIDIA H200 datasheet, H200 SXM: BF16 1,979 TFLOPS with sparsity"),
    ("A100", 312.0, "NVIDIA A100 datasheet, SXM and PCIe: BF16 312 TFLOPS dense (624 with sparsity)"),
    ("L40S", 362.0, "NVIDIA L40S datasheet: BF16 362.05 TFLOPS dense (733 with sparsity)"),
    ("B200", 2250.0, "NVIDIA HGX B200 datasheet: FP16/BF16 36 PFLOPS with sparsity for 8 GPUs"),
)


def known_peak_tflops(name: str) -> tuple[str, float] | None:
    """(the table's matching name, its dense bf16 TFLOPS) for a device name, by substring, case-insensitive; None
    for a device the table does not know (CPU ranks included)."""
    folded = name.casefold()
    for pattern, tflops, _source in KNOWN_PEAK_TFLOPS:
        if pattern.casefold() in folded:
            return pattern, tflops
    return None


@dataclass(frozen=True)
class Device:
    """kind: DeepSpeed's accelerator name ("cuda", "cpu", ...); name: torch.cuda.get_device_name, or CPU_NAME;
    memory_bytes: the card's total memory (the smallest over the ranks inside a process group), None off CUDA."""

    kind: str
    name: str
    memory_bytes: int | None = None

    @property
    def known_peak(self) -> tuple[str, float] | None:
        return known_peak_tflops(self.name) if self.kind == "cuda" else None

    def as_json(self) -> dict[str, object]:
        peak = self.known_peak
        return {**asdict(self), "known_peak_tflops": None if peak is None else peak[1]}


def this_device(accelerator: str | None = None) -> Device:
    """The device of this process (`accelerator`: DeepSpeed's name; None: `distributed.accelerator_name()`).

    On CUDA a rank (inside a process group) reads its current device, the one it bound; this is then a collective
    (every rank must call it): each rank takes the smallest memory any rank read, so that every rank judges the
    launch by one budget and gives one answer. Outside a process group (`moe train` before it starts the ranks)
    it reads the smallest of the visible cards (`torch.cuda.device_count()`), the one the launch's ranks could
    get. Whether `get_device_properties` leaves a CUDA context in the launching process has not been measured
    (cudaGetDeviceProperties needs none; `mem_get_info` does create one, pytorch/pytorch#103584)."""
    from .distributed import accelerator_name

    kind = accelerator or accelerator_name()
    if kind != "cuda":
        return Device(kind, CPU_NAME if kind == "cpu" else kind)
    import torch
    import torch.distributed as dist

    indices = [torch.cuda.current_device()] if dist.is_initialized() else range(torch.cuda.device_count())
    props = min((torch.cuda.get_device_properties(i) for i in indices), key=lambda p: p.total_memory)
    memory = int(props.total_memory)
    if dist.is_initialized():
        from .distributed import collective_device

        figure = torch.tensor([float(memory)], dtype=torch.float64, device=collective_device())
        dist.all_reduce(figure, op=dist.ReduceOp.MIN)
        memory = int(figure.item())
    return Device(kind, props.name, memory)


def peak_tflops_warning(recipe: Recipe, device: Device) -> str | None:
    """One line when `hardware.peak_tflops` is the schema's default (not set by the recipe, its `base:` chain or a
    --set: pydantic's `model_fields_set` of the validated hardware section) and the device's known dense bf16 peak
    differs from it; None otherwise (a figure the recipe sets is the user's, a device the table does not know has
    nothing to compare with)."""
    known = device.known_peak
    if known is None or "peak_tflops" in recipe.hardware.model_fields_set:
        return None
    pattern, tflops = known
    stated = recipe.hardware.peak_tflops
    if stated == tflops:
        return None
    return (f"moe: warning: hardware.peak_tflops is the default {stated:g}, not set in the recipe; the {device.name} "
            f"peaks at {tflops:g} TFLOPS dense bf16 ({pattern}, vendor datasheet), so the logged mfu is "
            f"{tflops / stated:.2f}x what it is against the card: set hardware.peak_tflops: {tflops:g} (or --set "
            f"hardware.peak_tflops={tflops:g})")
