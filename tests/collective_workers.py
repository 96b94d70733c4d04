"""Programs for test_collectives.py: the Communicator's guarantees on real gloo ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from shardopt.zero.comm import BufferOwnershipError, CollectiveMismatchError, Communicator
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


class NativeOnGloo(Communicator):
    """The native (NCCL) code path run on gloo, which has the flat all-gather it needs."""


def native_chunked_all_gather(rank: int, world: int) -> dict[str, object]:
    """The native chunked all-gather is asynchronous: its chunks are owned until the wait, which
    copies them out of a pooled flat buffer reused by the next call."""
    comm = NativeOnGloo(dist.group.WORLD, check=True, poison=True)
    storage = torch.zeros(world * 10)
    chunks = [storage[r * 10 + 2 : r * 10 + 7] for r in range(world)]  # non-adjacent
    out = {}
    for call in range(3):
        chunks[rank].copy_(torch.arange(5.0) + 100 * rank + call)
        work = comm.all_gather_chunks(chunks, chunks[rank], async_op=True)
        if call == 0:
            out["owned_while_in_flight"] = _raised(lambda: comm.all_reduce_avg(storage[12:14], async_op=True))
        work.wait()
        expected = torch.cat([torch.arange(5.0) + 100 * r + call for r in range(world)])
        out[f"call{call}"] = bool(torch.equal(torch.cat(chunks), expected))
        out[f"allocations{call}"] = comm.pool.num_allocations
    out["gaps_untouched"] = bool((storage.view(world, 10)[:, :2] == 0).all())
    # Five gathers launched before any wait stage at most GATHERS_IN_FLIGHT buffers.
    buckets = [torch.zeros(world * 10) for _ in range(5)]
    works = []
    for index, flat in enumerate(buckets):
        pieces = [flat[r * 10 + 1 : r * 10 + 6] for r in range(world)]
        pieces[rank].fill_(10 * index + rank)
        works.append(comm.all_gather_chunks(pieces, pieces[rank], async_op=True))
    out["window_allocations"] = comm.pool.num_allocations - out["allocations2"]
    for work in works:
        work.wait()
    out["window_ok"] = all(bool((flat.view(world, 10)[r, 1:6] == 10 * i + r).all())
                           for i, flat in enumerate(buckets) for r in range(world))
    out["lent"] = comm.pool.num_lent
    return out


def suite(rank: int, world: int, programs: list[str]) -> dict[str, object]:
    return {name: globals()[name](rank, world) for name in programs}
