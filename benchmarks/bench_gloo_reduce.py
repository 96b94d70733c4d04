"""Bytes gloo moves for a reduce to one rank: ``dist.reduce`` against shardopt's all-to-all.

Each of ``world`` spawned gloo ranks (127.0.0.1) reduces a 16 MiB fp32 tensor to
rank 0 five times, first with ``torch.distributed.reduce``, then with
``shardopt.zero.comm_gloo.GlooCommunicator.reduce_avg`` (the path ZeroOptimizer
uses for Muon's matrices at stage 2 on gloo). Rank 0 reads the ``lo`` transmit
counter of ``/proc/net/dev`` around each, between barriers, and prints bytes
per call over the tensor's bytes; the ideal is ``world - 1`` (every other rank
sends its copy once).

Usage, from the repository root::

    python benchmarks/bench_gloo_reduce.py
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from measure import lo_bytes

NUMEL = 1 << 22
CALLS = 5


def rank_main(rank: int, world: int, store_path: str, results: Any) -> None:
    from shardopt.zero.comm_gloo import communicator_for

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    comm = communicator_for(dist.group.WORLD)
    tensor = torch.ones(NUMEL)
    ratios = {}
    for name, reduce in (("dist.reduce", lambda: dist.reduce(tensor, 0)),
                         ("shardopt reduce_avg", lambda: comm.reduce_avg(tensor, 0))):
        dist.barrier()
        before = lo_bytes()[1]
        dist.barrier()
        for _ in range(CALLS):
            reduce()
        dist.barrier()
        ratios[name] = (lo_bytes()[1] - before) / CALLS / (4 * NUMEL)
    if rank == 0:
        results.put(ratios)
    dist.destroy_process_group()


def main() -> None:
    ctx = mp.get_context("spawn")
    for world in (2, 4):
        results = ctx.Queue()
        with tempfile.TemporaryDirectory() as tmp:
            procs = [ctx.Process(target=rank_main, args=(r, world, os.path.join(tmp, "store"), results))
                     for r in range(world)]
            for proc in procs:
                proc.start()
            ratios = results.get(timeout=300)
            for proc in procs:
                proc.join()
        shown = ", ".join(f"{name} {value:.2f}" for name, value in ratios.items())
        print(f"world {world}: bytes on the wire per call / tensor bytes (ideal {world - 1}): {shown}")


if __name__ == "__main__":
    main()
