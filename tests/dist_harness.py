"""Run a function on N gloo ranks (separate processes) with a hard timeout.

Forkserver (never a plain fork: a forked child of a process that used torch's
thread pool can deadlock; the forkserver itself never runs a torch op), a
FileStore rendezvous in a temporary directory, and a deadline after which
every rank is killed and the test fails: a rank that hangs in a collective
fails the test instead of hanging CI.
"""

from __future__ import annotations

import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def _entry(fn: Callable, rank: int, world_size: int, store_path: str, results: Any, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, "ok", out))
    except BaseException:  # deliberately broad: reported to the parent with the traceback
        results.put((rank, "error", traceback.format_exc()))


# The forkserver imports these once; each rank is then a fork of that clean, single-threaded
# server (it never ran a torch op, so no thread pool is copied mid-use), which saves every
# rank the seconds of importing torch that a spawned interpreter pays.
PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp", "shardopt"]


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Return ``[fn(rank, world_size, *args) for each rank]``; raise on error or timeout."""
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_entry, args=(fn, rank, world_size, store_path, results, args))
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        outputs: dict[int, Any] = {}
        errors: list[str] = []
        try:
            for _ in range(world_size):
                rank, status, payload = results.get(timeout=timeout)
                if status == "ok":
                    outputs[rank] = payload
                else:
                    errors.append(f"rank {rank}:\n{payload}")
                    break
        except queue.Empty:
            errors.append(f"timed out after {timeout} s; ranks that finished: {sorted(outputs)}")
        finally:
            for proc in procs:
                proc.join(timeout=5 if not errors else 0.5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        if errors:
            raise AssertionError("distributed run failed: " + "\n".join(errors))
    return [outputs[rank] for rank in range(world_size)]
