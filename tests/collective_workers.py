"""Programs for test_collectives.py: the Communicator's guarantees on real gloo ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from shardopt.zero.comm import BufferOwnershipError, CollectiveMismatchError
from shardopt.zero.comm_gloo import communicator_for


def _raised(fn) -> str:
    try:
        fn()
    except (CollectiveMismatchError, BufferOwnershipError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def mismatched_exchange_dtype(rank: int, world: int) -> str:
    """The defect of issue 16 in miniature: one rank exchanges bf16, its peer fp32."""
    comm = communicator_for(dist.group.WORLD, check=True, poison=True)
    dtype = torch.bfloat16 if rank == 0 else torch.float32
    counts = [0 if r == rank else 3 for r in range(world)]
    return _raised(lambda: comm.exchange(torch.ones(sum(counts), dtype=dtype), counts, counts, dtype))


def mismatched_exchange_counts(rank: int, world: int) -> str:
    """Rank 0 sends 3 elements to each peer, which expect 2."""
    comm = communicator_for(dist.group.WORLD, check=True, poison=True)
    send = [0 if r == rank else (3 if rank == 0 else 2) for r in range(world)]
    receive = [0 if r == rank else 2 for r in range(world)]
    return _raised(lambda: comm.exchange(torch.ones(sum(send)), send, receive, torch.float32))


def mismatched_all_gather(rank: int, world: int) -> str:
    comm = communicator_for(dist.group.WORLD, check=True, poison=True)
    flat = torch.zeros(world * (4 if rank == 0 else 5))
    return _raised(lambda: comm.all_gather_inplace(flat, async_op=True).wait())


def ownership(rank: int, world: int) -> dict[str, object]:
    """A collective on bytes an in-flight one owns raises; after the wait it runs."""
    comm = communicator_for(dist.group.WORLD, check=True)
    flat = torch.arange(8 * world, dtype=torch.float32) + rank
    output = torch.empty(8)
    work = comm.reduce_scatter_avg(output, flat, async_op=True)
    owned = comm.num_in_flight_buffers
    overlapping = _raised(lambda: comm.all_reduce_avg(flat[3:5], async_op=True))
    disjoint = _raised(lambda: comm.all_reduce_avg(torch.ones(2), async_op=True).wait())
    work.wait()
    after = comm.num_in_flight_buffers
    comm.all_reduce_avg(flat[3:5], async_op=True).wait()
    expected = torch.arange(8 * world, dtype=torch.float32)[rank * 8 : (rank + 1) * 8] + (world - 1) / 2
    return {"owned": owned, "overlapping": overlapping, "disjoint": disjoint, "after": after,
            "mean_ok": bool(torch.equal(output, expected))}


def poison(rank: int, world: int) -> dict[str, bool]:
    comm = communicator_for(dist.group.WORLD, check=True, poison=True)
    fresh = comm.empty(5, torch.float32, torch.device("cpu"))
    used = torch.ones(4)
    comm.retire(used)
    plain = communicator_for(dist.group.WORLD, poison=False)
    kept = torch.ones(4)
    plain.retire(kept)
    return {"fresh_nan": bool(fresh.isnan().all()), "retired_nan": bool(used.isnan().all()),
            "kept": bool((kept == 1).all())}


def suite(rank: int, world: int, programs: list[str]) -> dict[str, object]:
    return {name: globals()[name](rank, world) for name in programs}
