"""Programs for test_checkpoint_faults.py: jobs where one rank dies (SIGKILL) or stalls.

:func:`start` spawns a job the way a launcher does (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``/``MASTER_PORT`` and ``SHARDOPT_TIMEOUT_S`` in the environment,
``shardopt.dist.init_from_env()``), unlike tests/dist_harness.py's ``run_ranks``,
which expects every rank to finish. :func:`collect` waits for the surviving ranks to
report and exit, records when each did, and kills what is left at a deadline,
so a hang fails the test instead of blocking it.

:func:`faulty_run` trains ``adamw/stage2`` (tests/checkpoint_workers.py) for
``STEPS`` steps at world size 2 or 3, saving at step ``SAVE_AT``; at step
``FAULT_AT`` the last rank writes the time to ``root/fault-time`` and then
kills itself after its backward (``kill``), sleeps forever there (``stall``) or
kills itself in the middle of writing the checkpoint of step ``FAULT_AT``
(``kill-in-save``: its second storage write). :func:`restart` resumes from
``checkpoint.latest`` of a job in the test process (one rank).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import queue
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from checkpoint_workers import build, state_of, train
from zero_workers import batch, lm_loss, local

from shardopt import checkpoint

TIMEOUT_S = 3.0  # SHARDOPT_TIMEOUT_S of every fault job: the bound survivors must meet
PROBE_TIMEOUT_S = 0.5
CONFIG = "adamw/stage2"
STEPS, SAVE_AT, FAULT_AT = 6, 2, 4


def _entry(fn: Any, rank: int, world: int, port: int, results: Any, args: tuple) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "SHARDOPT_BACKEND": "gloo",
                       "SHARDOPT_TIMEOUT_S": str(TIMEOUT_S), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    try:
        import shardopt.dist

        shardopt.dist.init_from_env()
        results.put((rank, "ok", fn(rank, world, *args), time.time()))
    except BaseException as error:  # deliberately broad: the survivors' errors are what is tested
        results.put((rank, "error", f"{type(error).__name__}: {error}", time.time()))


@dataclass
class Job:
    """A spawned job; ``reports[rank] = (status, payload, time)`` and ``exits[rank] = time``."""

    procs: list[Any]
    results: Any
    survivors: tuple[int, ...]
    reports: dict[int, tuple[str, Any, float]] = field(default_factory=dict)
    exits: dict[int, float] = field(default_factory=dict)

    def poll(self) -> bool:
        """Record new reports and exits; ``True`` once every survivor reported and exited."""
        with contextlib.suppress(queue.Empty):
            while True:
                rank, status, payload, when = self.results.get_nowait()
                self.reports[rank] = (status, payload, when)
        for rank, proc in enumerate(self.procs):
            if rank not in self.exits and proc.exitcode is not None:
                self.exits[rank] = time.time()
        return all(rank in self.reports and rank in self.exits for rank in self.survivors)


def collect(jobs: list[Job], deadline_s: float) -> None:
    """Poll ``jobs`` together (exit times stay accurate) until every survivor reported and exited,
    at most ``deadline_s``; then kill what is left (a stalled rank, or a hang: a missing report)."""
    end = time.time() + deadline_s
    while not all(job.poll() for job in jobs) and time.time() < end:
        time.sleep(0.02)
    for job in jobs:
        for proc in job.procs:
            if proc.is_alive():
                proc.kill()
            proc.join()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(fn: Any, world: int, *args: Any, survivors: tuple[int, ...] = ()) -> Job:
    """Spawn ``fn(rank, world, *args)`` on ``world`` ranks that join through ``init_from_env``;
    :func:`collect` waits for the ``survivors``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, rank, world, port, results, args), daemon=True)
             for rank in range(world)]
    for proc in procs:
        proc.start()
    return Job(procs, results, survivors)


def _mark_fault(root: str) -> None:
    """The moment of the fault, for the parent (a file: a queue's feeder thread dies with SIGKILL)."""
    with open(Path(root) / "fault-time", "w") as file:
        file.write(repr(time.time()))
        file.flush()
        os.fsync(file.fileno())


def _die_in_second_write(root: str) -> None:
    """Make this rank SIGKILL itself when DCP's file system writer starts its second item."""
    import torch.distributed.checkpoint.filesystem as fs

    original, calls = fs._write_item, []

    def write_item(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            _mark_fault(root)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    fs._write_item = write_item


def probe_collectives(rank: int) -> dict[str, float]:
    """Rank 0 issues each collective ZeroOptimizer uses, asynchronously, on its own group with a
    ``PROBE_TIMEOUT_S`` timeout, while rank 1 never joins; then ``work.wait()`` with no argument.
    Returns, per collective, the seconds until the wait raised (``inf`` if it returned)."""
    names = ["all_to_all_single", "all_gather", "all_reduce", "reduce", "broadcast"]
    groups = {name: dist.new_group([0, 1], timeout=datetime.timedelta(seconds=PROBE_TIMEOUT_S)) for name in names}
    out: dict[str, float] = {}
    if rank == 0:
        t = torch.ones(4)
        launched = time.time()
        works = {"all_to_all_single": dist.all_to_all_single(torch.empty(4), t, group=groups["all_to_all_single"],
                                                             async_op=True),
                 "all_gather": dist.all_gather([torch.empty(4), torch.empty(4)], t, group=groups["all_gather"],
                                               async_op=True),
                 "all_reduce": dist.all_reduce(t.clone(), group=groups["all_reduce"], async_op=True),
                 "reduce": dist.reduce(t.clone(), 1, group=groups["reduce"], async_op=True),
                 "broadcast": dist.broadcast(t.clone(), 0 + 1, group=groups["broadcast"], async_op=True)}
        for name, work in works.items():
            try:
                work.wait()
                out[name] = float("inf")
            except RuntimeError:
                out[name] = time.time() - launched
    dist.barrier()  # rank 1 waits here meanwhile (within the job's TIMEOUT_S)
    return out


def faulty_run(rank: int, world: int, root: str, fault: str) -> dict[str, Any]:
    """Train ``CONFIG``, save at ``SAVE_AT``; the last rank faults at ``FAULT_AT`` (module doc).
    Survivors raise from a collective (reported by :func:`_entry`); nobody returns normally."""
    victim = world - 1
    Path(root).mkdir(parents=True, exist_ok=True)
    if fault == "stall":
        probes = probe_collectives(rank)
        if rank == 0:  # written now: rank 0 ends in an error, not a return
            (Path(root) / "probes.json").write_text(json.dumps(probes))
    model, opt = build(CONFIG)
    for step in range(STEPS):
        if step == SAVE_AT:
            checkpoint.save(state_of(model, opt), root, step)
        if step == FAULT_AT and fault == "kill-in-save":
            if rank == victim:
                _die_in_second_write(root)
            checkpoint.save(state_of(model, opt), root, step)
        if step == FAULT_AT and rank == victim and fault in ("kill", "stall"):
            lm_loss(model, local(batch(step), rank, world)).backward()
            _mark_fault(root)
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        train(model, opt, CONFIG, range(step, step + 1), rank, world)
    return {}


def restart(root: str) -> tuple[int, list[torch.Tensor]]:
    """In this process (one rank, no process group: the restarted job may have another size),
    load ``checkpoint.latest(root)`` and train to ``STEPS``: its step and parameters."""
    model, opt = build(CONFIG, seed=123)
    path = checkpoint.latest(root)
    checkpoint.load(state_of(model, opt), path)
    train(model, opt, CONFIG, range(checkpoint.step_of(path), STEPS), 0, 1)
    return checkpoint.step_of(path), [p.detach().clone() for p in model.parameters()]


def uninterrupted() -> list[torch.Tensor]:
    """The run without a fault, in this process."""
    model, opt = build(CONFIG)
    train(model, opt, CONFIG, range(STEPS), 0, 1)
    return [p.detach().clone() for p in model.parameters()]
