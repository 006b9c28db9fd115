"""Process-group start for every rank-side program (training, tests' rank programs, benchmarks' rank programs)."""

from __future__ import annotations

import os


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


def init_distributed() -> tuple[int, int]:
    """`deepspeed.init_distributed()`, then release DeepSpeed's CPU shared-memory name. Returns (rank, world size).
    CPU ranks share the cores (`share_cpu_cores`)."""
    import deepspeed
    import torch.distributed as dist

    share_cpu_cores()
    deepspeed.init_distributed()
    rank = dist.get_rank()
    release_shared_memory_name(rank)
    return rank, dist.get_world_size()


def release_shared_memory_name(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer name once every rank has mapped every buffer.

    DeepSpeed's shm communication op (CPU ranks) creates `/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`
    (69 MB) per rank and never unlinks it: every run, killed or not, left its buffers in memory-backed /dev/shm
    (seen: 18 GB after a day of tests). The mappings stay valid after the unlink, so nothing leaks even on SIGKILL.
    """
    import torch.distributed as dist

    dist.barrier()  # every rank has finished DeepSpeed's backend init, which maps all peers' buffers
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass  # not a CPU run, or DeepSpeed changed its naming
