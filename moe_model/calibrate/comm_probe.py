"""Rank program of `moe calibrate`: how fast this machine's ranks move a recipe's messages to each other.

    deepspeed --num_gpus N -m moe_model.calibrate.comm_probe --p2p-bytes A --a2a-bytes B --out F.json

Every rank pairs with rank ^ 1 (all pairs at once, as a run's ranks share the machine) and times, median of 30 after
a warm-up: a send + receive of A bytes each way (a pipeline stage's activation, then its gradient) and an all-to-all
of B bytes over the pair (an expert-parallel dispatch), each at B or A bytes and at 4 bytes. The difference is the
size-dependent part; the 4-byte time is latency, which the calibration's shrunken training run already contains.
Rank 0 writes the slowest pair's figures to F.json.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

from ..launch import rank_program_parser
from .timing import median_seconds

SMALL = 4


def _median_s(fn) -> float:
    """Median of 30 timed calls after 3 warm-up ones, every rank starting together."""
    import torch.distributed as dist

    for _ in range(3):
        fn()
    dist.barrier()
    return median_seconds(fn, 30, warmup=0)


def _exchange(send: torch.Tensor, recv: torch.Tensor, rank: int, peer: int, world: int) -> None:
    """Send then receive on even ranks, receive then send on odd ones (a rank without a peer does nothing)."""
    import torch.distributed as dist

    if peer >= world:
        return
    if rank % 2 == 0:
        dist.send(send, peer)
        dist.recv(recv, peer)
    else:
        dist.recv(recv, peer)
        dist.send(send, peer)


def _all_to_all(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    import torch.distributed as dist

    if group is not None:
        dist.all_to_all_single(out, inp, group=group)


def probe(p2p_bytes: int, a2a_bytes: int) -> dict:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    pairs = [dist.new_group([i, i + 1]) for i in range(0, world - 1, 2)]
    peer = rank ^ 1
    group = pairs[rank // 2] if peer < world else None
    out = {}
    for nbytes, name in ((SMALL, "small"), (p2p_bytes, "p2p")):
        elements = max(1, nbytes // 4)
        send, recv = torch.ones(elements), torch.empty(elements)
        out[f"round_trip_{name}_s"] = _median_s(functools.partial(_exchange, send, recv, rank, peer, world))
    for nbytes, name in ((2 * SMALL, "small"), (a2a_bytes, "a2a")):
        elements = 2 * max(1, nbytes // 8)  # even: half for each rank of the pair
        inp, result = torch.ones(elements), torch.empty(elements)
        out[f"all_to_all_{name}_s"] = _median_s(functools.partial(_all_to_all, result, inp, group))
    slowest = torch.tensor(list(out.values()), dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return dict(zip(out, slowest.tolist()))


def main() -> int:
    parser = rank_program_parser()
    parser.add_argument("--p2p-bytes", type=int, required=True)
    parser.add_argument("--a2a-bytes", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from ..train.distributed import init_distributed

    rank, world = init_distributed()
    if world < 2:
        raise SystemExit("the communication probe needs at least 2 ranks")
    import torch.distributed as dist

    figures = probe(args.p2p_bytes, args.a2a_bytes)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"ranks": world, "p2p_bytes": args.p2p_bytes,
                                              "a2a_bytes": args.a2a_bytes, **figures}))
    dist.barrier()  # no rank leaves while a peer's gloo threads still talk to it
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
