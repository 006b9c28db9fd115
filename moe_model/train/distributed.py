"""Process-group start for every rank-side program (training, tests' rank programs, benchmarks' rank programs), and
what a launch gives its ranks: the accelerator, the CPU allocator setting, the check for a stale extension build lock.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# glibc's malloc serves every block over its mmap threshold (grown dynamically up to 32 MB) with a fresh mmap and
# returns it on free, so each CPU step's gradients, logits and activations are first-touch page faults (about half of
# a tiny CPU step). Never mmap, never trim: freed memory is reused, as a GPU's caching allocator does. glibc reads
# these once at process start, so they belong in the environment of the launch (`launch_env`).
# The price: the heap never shrinks and its holes grow it (dropless routing allocates other sizes every step): a rank
# of benchmarks/startup_memory.py --ranks 2 --layers 2 whose live peak is 1.69 GB holds 2.28 GB after 2 steps and
# 2.67 GB after 10. A threshold fixed at glibc's ceiling (32 MB) instead kept it at the live peak but made a 4-rank
# parity test 1.7x slower (82.7 s against 48.7 s; the suite's tests: 29 min).
HEAP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**46)}
STALE_LOCK_S = 60  # a build lock this old with no build running in its folder was left by a killed build


def collective_device(group=None):
    """The device a collective's tensors must sit on, the one rule for every all-reduce of the trainer: the group's
    backend decides (NCCL reduces CUDA tensors only, on the device DeepSpeed set for this rank; gloo CPU tensors)."""
    import torch
    import torch.distributed as dist

    if "nccl" in dist.get_backend(group):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def accelerator_name() -> str:
    """DeepSpeed's own accelerator detection ("cuda", "cpu", ...), without its "Setting accelerator to CPU" warning."""
    from .console import quiet_libraries

    quiet_libraries()
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def launch_env() -> dict[str, str]:
    """What a launch by `moe train` adds to the ranks' environment: the accelerator detected once here
    (`DS_ACCELERATOR`, so that the launcher and every rank skip detection and its warning), and on CPU `HEAP_ENV`.
    Values already in this process's environment win (a user's own DS_ACCELERATOR or malloc setting)."""
    name = os.environ.get("DS_ACCELERATOR") or accelerator_name()
    env = {"DS_ACCELERATOR": name, **(HEAP_ENV if name == "cpu" else {})}
    return {k: os.environ.get(k, v) for k, v in env.items()}


def extension_roots() -> list[Path]:
    """Where torch builds JIT extensions (DeepSpeed's ops): TORCH_EXTENSIONS_DIR, else torch's default root."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return [Path(root)]
    from torch.utils.cpp_extension import get_default_build_root

    return [Path(get_default_build_root())]


def _build_running_in(folder: Path) -> bool:
    """Whether some process of this machine works in `folder` (torch runs ninja there while it holds the lock)."""
    folder = folder.resolve()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:
            continue
        if cwd == folder or folder in cwd.parents:
            return True
    return False


def stale_build_lock(roots: list[Path] | None = None, now: float | None = None) -> Path | None:
    """A `lock` file left in an extension build folder by a build that was killed, or None.

    torch's `FileBaton` creates `<build folder>/lock` before a JIT build and removes it after; a build killed in
    between leaves it, and every later run waits on it forever (`FileBaton.wait` has no timeout). A lock counts as
    stale when it is older than `STALE_LOCK_S` and no process of this machine works in its folder (on a home folder
    shared between nodes, a build that another node has been running for longer looks stale too).
    """
    now = time.time() if now is None else now
    for root in extension_roots() if roots is None else roots:
        for lock in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
            try:
                age = now - lock.stat().st_mtime
            except FileNotFoundError:
                continue  # the build finished meanwhile
            if age > STALE_LOCK_S and not _build_running_in(lock.parent):
                return lock
    return None


def cpu_threads_per_rank(local_ranks: int) -> int:
    """Intra-op threads each of `local_ranks` CPU ranks gets: this process's cores shared evenly, at least one."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_ranks))


def share_cpu_cores() -> None:
    """On CPU ranks, give each rank its share of the cores unless OMP_NUM_THREADS says otherwise.

    Every rank's torch otherwise starts one thread per core, and the deepspeed launcher (unlike torchrun, which sets
    OMP_NUM_THREADS=1) leaves it so: 4 ranks on 2 cores ran 8 spinning threads, and the tiny recipe's step took
    0.37 s instead of 0.10 s with one thread per rank.
    """
    import torch
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(cpu_threads_per_rank(int(os.environ.get("LOCAL_SIZE", "1"))))


# CUDA ranks: the caching allocator maps growable segments instead of fixed blocks, so that memory freed by one
# step's shapes serves the next step's (dropless routing changes the expert GEMMs' sizes every step) rather than
# fragmenting; read when the allocator first starts, so set before any CUDA call (`bind_device`). A user's own
# PYTORCH_CUDA_ALLOC_CONF wins.
CUDA_ALLOC_CONF = "expandable_segments:True"


def bind_device() -> None:
    """On CUDA, make `cuda:LOCAL_RANK` this process's current device before any collective.

    Why: DeepSpeed 0.19.8 binds the NCCL group to `cuda:LOCAL_RANK` (`device_id=` in `comm/torch.py`'s
    `init_process_group`) but calls `set_device` only in `DeepSpeedEngine.__init__`, so every collective before the
    engine (the output folder's verdict, the resume point, the data's readiness) would put local ranks 1..7's
    tensors on cuda:0 (`collective_device` follows the current device)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cuda":
        return
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
    accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(timeout_min: float | None = None) -> tuple[int, int]:
    """Start this rank's process group: SLURM's variables adopted when `srun` started it (`cluster.adopt_slurm`),
    CPU ranks' share of the cores, the device bound (`bind_device`), then `deepspeed.init_distributed` with a
    collective timeout of `timeout_min` minutes (DeepSpeed's default, 10, is shorter than one rank tokenizing a
    corpus or verifying a large checkpoint while the others wait; None: the recipe schema's default of
    `train.collective_timeout_min`, for programs without a recipe), DeepSpeed's CPU shared-memory op left out
    (`skip_cpu_shm_op`). Returns (rank, world size)."""
    from datetime import timedelta

    import deepspeed
    import torch.distributed as dist

    from ..recipe import TrainSection
    from .cluster import adopt_slurm

    if timeout_min is None:
        timeout_min = TrainSection.model_fields["collective_timeout_min"].default
    adopt_slurm()
    share_cpu_cores()
    bind_device()
    skip_cpu_shm_op()
    deepspeed.init_distributed(timeout=timedelta(minutes=timeout_min))
    # every rank has finished connecting before any goes on: a rank that refuses the launch right after
    # (`main.launch_problem`) must not exit while a peer is still in gloo's rendezvous (it died of DistNetworkError,
    # exit 1, instead of giving the refusal's exit 2)
    dist.barrier()
    return dist.get_rank(), dist.get_world_size()


def close_distributed() -> None:
    """Tear the process group down at the end of a run (NCCL otherwise warns that it was never destroyed and may
    hang the interpreter's exit on some drivers)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def skip_cpu_shm_op() -> None:
    """Keep DeepSpeed's shared-memory communication op out of CPU ranks' process groups.

    Library gap (DeepSpeed 0.19.8, CPU accelerator): `TorchBackend.__init__` JIT-compiles the `deepspeed_shm_comm`
    C++ op on every machine and virtual environment it has not seen (measured: 50 s of a core, before any rank can
    go on), then maps a 69 MB `/dev/shm/deepspeed_allreduce_buffer_*` per rank that it never unlinks (18 GB after a
    day of tests), all for `inference_all_reduce`, which training never calls (its collectives are torch's). Marked
    incompatible, as DeepSpeed marks it on a CPU that cannot build it, the op is neither built nor mapped, and
    `inference_all_reduce` takes torch's all-reduce, DeepSpeed's own fall-back. GPU ranks do not build it."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
