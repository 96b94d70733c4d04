"""What ``bench_zero.py`` and ``bench_muon.py`` share: data, ranks, timing, counters, options, tables.

Both benchmarks train the byte-level GPT of ``examples/gpt_model.py`` (put on
``sys.path`` here, the only path set-up; the scripts import this module as a
sibling) on windows of the standard library's sources, one fresh spawn of
``world`` gloo ranks on 127.0.0.1 per (system, world size) run. Each rank
(:func:`rank_main`) builds its system (a :class:`Built`), runs ``--warmup``
untimed steps, then ``--steps`` timed steps between two barriers, and writes
one JSON file that the parent (:func:`run_ranks`) gathers into a :class:`Run`.

Measured per rank over the timed window (between the barriers):

* phase times: ``time.perf_counter`` around forward, backward, optimizer step
  and zero_grad of every step;
* ``lo`` rx/tx bytes of ``/proc/net/dev`` (machine-wide: every byte gloo sends
  over 127.0.0.1, and any other process's loopback traffic), ``wchar`` of
  ``/proc/self/io`` (this rank's write syscalls: gloo sends with writev) and
  ``time.process_time`` (this rank's CPU time, all threads);
* deltas of ``comm_stats()`` (shardopt's ring-model byte count) and of any
  counters the system exposes (``Built.counters``), per step;
* ranges (when the benchmark names any, :class:`StepProfiler`): ``torch.profiler``
  with CPU activity runs over the timed window, the benchmark marks each phase
  with ``record_function("bench.<phase>")``, and each named range (shardopt
  emits ``shardopt.grad_copy``, ``shardopt.reduce_launch`` and the others named
  below) is totalled per step and phase, in seconds spent
  in it outside other named ranges nested in it (:func:`step_ranges`). A
  function without a range can be timed by the profiler's Python tracer
  (``with_stack=True``, only then: ``Built.traced``). Nothing in shardopt is
  wrapped or replaced; the profiler adds its own per-op cost to the timed steps
  of every system it runs for.

After the window: rank 0's loss on a fixed held-out batch, the optimizer-state
bytes (``Built.state_parts``) and the peak resident set size (VmHWM).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# The examples' model, found relative to this file (no installed package).
_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)

from gpt_model import GPT, PRESETS, GPTConfig, num_params  # noqa: E402
from measure import (  # noqa: E402
    batch_for,
    corpus,
    lm_loss,
    lo_bytes,
    load_average,
    state_by_name,
    tensor_bytes,
    vm_hwm_bytes,
    written_bytes,
)
from profile_ranges import PHASES, StepProfiler  # noqa: E402

__all__ = ["GPT", "PRESETS", "GPTConfig", "num_params"]  # re-exported for the benchmarks

@dataclass(frozen=True)
class Config:
    """What every rank of a run needs (pickled to the spawned ranks)."""

    preset: str
    seq: int | None
    batch: int
    warmup: int
    steps: int
    threads: int
    seed: int
    timeout: float
    ranges: tuple[str, ...] = ()  # record_function ranges totalled per step; none: no profiler

    def model_config(self) -> GPTConfig:
        base = PRESETS[self.preset]
        return replace(base, seq_len=self.seq) if self.seq else base


# ---------------------------------------------------------------------- systems


@dataclass
class Built:
    """One system, ready to train: the parts of a step and what to read from it.

    ``state_parts()`` returns optimizer-state bytes by name on this rank, with a
    separate fp32 master copy of the parameters (where the system keeps one)
    under ``"master_params"``. ``counters()`` returns monotone counts read
    before and after the timed window (reported per step, summed over ranks).
    ``traced`` maps profiler Python-function event names (:func:`python_event`)
    to the range name they count as, for work that emits no range.
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor], None]
    step: Callable[[], Any]
    zero_grad: Callable[[], None]
    state_parts: Callable[[], dict[str, int]]
    comm_stats: Callable[[], dict[str, int]] | None = None
    counters: Callable[[], dict[str, float]] | None = None
    traced: dict[str, str] = field(default_factory=dict)
    note: str = ""


def built_module(module: torch.nn.Module, opt: Any, state_parts: Callable[[], dict[str, int]], **fields: Any) -> Built:
    """``module`` trained by ``loss.backward()`` and ``opt`` (``step()``, ``zero_grad()``)."""
    return Built(forward=lambda tokens: lm_loss(module, tokens), backward=lambda loss: loss.backward(),
                 step=opt.step, zero_grad=opt.zero_grad, state_parts=state_parts, **fields)


def built_zero(model: torch.nn.Module, opt: Any, **fields: Any) -> Built:
    """A ``shardopt.ZeroOptimizer`` over ``model`` (no DDP: its hooks average the gradients)."""

    def state_parts() -> dict[str, int]:
        report = opt.memory_report()
        return {"master_params": report["master_params"], **report["optimizer_states"]}

    fields = {"comm_stats": opt.comm_stats, "note": "memory_report(): master_params + optimizer_states", **fields}
    return built_module(model, opt, state_parts, **fields)


def built_deepspeed(model: torch.nn.Module, stage: int, batch: int, optimizer: dict[str, Any], note: str,
                    **extra: Any) -> Built:
    """``deepspeed.initialize`` at ZeRO ``stage``, fp32, no clipping, with ``optimizer`` (its config entry).

    State: every tensor in ``engine.optimizer.optimizer.state`` (the optimizer
    over this rank's flat fp32 partitions), the partitions themselves
    (``single_partition_of_fp32_groups``, as ``master_params``) and, for Muon,
    the momentum staging copy (``_muon_pending_momentum``).
    """
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "optimizer": optimizer,
        "gradient_clipping": 0,
        "zero_optimization": {"stage": stage},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    zero_opt = engine.optimizer  # DeepSpeedZeroOptimizer
    inner = zero_opt.optimizer  # the configured optimizer over this rank's flat fp32 partitions

    def state_parts() -> dict[str, int]:
        parts = state_by_name(inner.state)
        parts["master_params"] = tensor_bytes(zero_opt.single_partition_of_fp32_groups)
        staged = getattr(zero_opt, "_muon_pending_momentum", {})
        if staged:
            parts["momentum staging copy"] = tensor_bytes(entry[0] for entry in staged.values())
        return parts

    return Built(
        forward=lambda tokens: lm_loss(engine, tokens),
        backward=lambda loss: engine.backward(loss),
        step=engine.step,
        zero_grad=lambda: None,  # engine.step() clears the gradients
        state_parts=state_parts,
        note=note,
        **extra,
    )


# ---------------------------------------------------------------------- one rank


def run_logged(rank: int, run_dir: str, body: Callable[..., None], *args: Any) -> None:
    """Run ``body(*args)`` with this rank's output in ``run_dir/rank{rank}.log``, traceback included."""
    log = open(os.path.join(run_dir, f"rank{rank}.log"), "w")  # noqa: SIM115
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        body(*args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise


def init_rank(rank: int, world: int, threads: int, run_dir: str, *, deepspeed: bool = False) -> None:
    """This rank's process group (gloo, FileStore in ``run_dir``), threads, and DeepSpeed's init."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    store = dist.FileStore(os.path.join(run_dir, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    if deepspeed:
        import logging

        import deepspeed as ds

        ds.utils.logger.setLevel(logging.WARNING)
        ds.init_distributed(dist_backend="gloo")


def finish_rank(rank: int, run_dir: str, result: Any) -> None:
    """Write this rank's result for the parent, then leave the process group together."""
    with open(os.path.join(run_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


Builder = Callable[[str, torch.nn.Module, Any], Built]
After = Callable[[str, Any, torch.Tensor], dict[str, Any]]


def rank_main(rank: int, world: int, system: str, cfg: Config, run_dir: str, build: Builder, *,
              deepspeed: bool = False, after: After | None = None) -> None:
    """One rank of a run (a spawned process's entry, logged): :func:`train_rank`."""
    run_logged(rank, run_dir, train_rank, rank, world, system, cfg, run_dir, build, deepspeed, after, time.time())


def train_rank(rank: int, world: int, system: str, cfg: Config, run_dir: str, build: Builder, deepspeed: bool,
               after: After | None, entered: float) -> None:
    """Build ``system``, train it, measure the timed window, write ``rank{rank}.json``.

    ``after(system, cfg, tokens)`` (optional) adds results computed after the
    window, given the first step's batch.
    """
    wall = {"entered": entered}
    init_rank(rank, world, cfg.threads, run_dir, deepspeed=deepspeed)
    torch.manual_seed(cfg.seed)
    model_config = cfg.model_config()
    model = GPT(model_config)
    built = build(system, model, cfg)
    wall["built"] = time.time()
    tokens, _ = corpus()

    def data(step: int) -> torch.Tensor:
        return batch_for(tokens, cfg.seed, step, rank, cfg.batch, model_config.seq_len)

    for step in range(cfg.warmup):
        loss = built.forward(data(step))
        built.backward(loss)
        built.step()
        built.zero_grad()

    counters = built.counters or dict
    comm_before = dict(built.comm_stats()) if built.comm_stats else {}
    counted_before = counters()
    profiler = StepProfiler(cfg.ranges, built.traced)
    with profiler:  # started before the window: its start-up is not timed
        dist.barrier()
        net_before = lo_bytes()
        written_before = written_bytes()
        cpu_before = time.process_time()  # this process's CPU time, all threads (gloo's included)
        wall["timed"] = time.time()
        phase_times: list[dict[str, float]] = []
        losses = []
        for step in range(cfg.warmup, cfg.warmup + cfg.steps):
            x = data(step)
            times: dict[str, float] = {}
            mark = time.perf_counter()
            for phase in PHASES:  # each timed, and marked for the profiler
                with profiler.phase(phase):
                    if phase == "forward":
                        loss = built.forward(x)
                    elif phase == "backward":
                        built.backward(loss)
                    else:
                        getattr(built, phase)()
                now = time.perf_counter()
                times[phase] = now - mark
                mark = now
            phase_times.append(times)
            losses.append(float(loss.detach()))
        dist.barrier()
        net_after = lo_bytes()
        written_after = written_bytes()
        cpu_after = time.process_time()
        wall["timed_end"] = time.time()
    comm_after = dict(built.comm_stats()) if built.comm_stats else {}
    counted_after = counters()
    ranges = profiler.ranges()

    # Outside the measured window: the loss of the trained weights on a fixed batch, then sizes.
    eval_tokens = batch_for(tokens, cfg.seed + 1, 0, 0, cfg.batch, model_config.seq_len)
    model.eval()
    with torch.no_grad():
        eval_loss = float(lm_loss(model, eval_tokens))
    result = {
        "rank": rank,
        "phase_times": phase_times,
        "ranges": ranges,
        "losses": losses,
        "eval_loss": eval_loss,
        "net_rx": net_after[0] - net_before[0],
        "net_tx": net_after[1] - net_before[1],
        "written": written_after - written_before,
        "cpu": cpu_after - cpu_before,
        "comm_per_step": {k: (comm_after[k] - comm_before.get(k, 0)) / cfg.steps for k in comm_after}
        if built.comm_stats else None,
        "counters_per_step": {k: (counted_after[k] - counted_before.get(k, 0)) / cfg.steps for k in counted_after},
        "state_parts": built.state_parts(),
        "note": built.note,
        "threads": torch.get_num_threads(),
        "vm_hwm": vm_hwm_bytes(),  # before after(), which builds more
    }
    if after is not None:
        result.update(after(system, cfg, data(0)))
    result["wall"] = {**wall, "done": time.time()}
    finish_rank(rank, run_dir, result)


# ---------------------------------------------------------------------- one run (parent)


def spawn_ranks(worker: Callable[..., None], job: Any, world: int, cfg: Any, prefix: str) -> list[Any]:
    """Run ``worker(rank, world, job, cfg, run_dir)`` on ``world`` spawned ranks; each rank's JSON.

    On an error, or past ``cfg.timeout`` seconds, every rank is killed and the
    tail of each rank's log printed.
    """
    with tempfile.TemporaryDirectory(prefix=prefix) as run_dir:
        ctx = mp.start_processes(worker, args=(world, job, cfg, run_dir), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + cfg.timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{job} at world size {world} ran past {cfg.timeout:.0f} s")
        except BaseException:
            # Our own ranks only: never leave them running after a failure or a timeout.
            for process in ctx.processes:
                if process.is_alive():
                    process.kill()
            for rank in range(world):
                path = os.path.join(run_dir, f"rank{rank}.log")
                if os.path.exists(path):
                    with open(path) as f:
                        tail = f.read()[-4000:]
                    print(f"--- {job} world {world} rank {rank} log (tail) ---\n{tail}", file=sys.stderr)
            raise
        ranks = []
        for rank in range(world):
            with open(os.path.join(run_dir, f"rank{rank}.json")) as f:
                ranks.append(json.load(f))
    return ranks


@dataclass
class Run:
    """One (system, world size) run, gathered from its ranks' results (``ranks``)."""

    system: str
    world: int
    ranks: list[dict[str, Any]]
    load: tuple[float, float]  # 1-minute load average before and after the run
    seconds: float  # the run's wall time, spawn to exit
    phases: dict[str, float]  # where that time went (rank 0; start = the last rank's)

    @property
    def steps(self) -> int:
        return len(self.ranks[0]["phase_times"])

    def phase_times(self, *phases: str) -> list[float]:
        """Rank 0's seconds per timed step in ``phases`` (all of them by default)."""
        return [sum(t[p] for p in phases or PHASES) for t in self.ranks[0]["phase_times"]]

    @property
    def step_times(self) -> list[float]:
        """Rank 0's wall time of each timed step: forward, backward, optimizer step, zero_grad."""
        return self.phase_times()

    @property
    def cpu_per_step(self) -> float:
        """CPU seconds per timed step, summed over ranks."""
        return sum(r["cpu"] for r in self.ranks) / self.steps

    @property
    def wire_per_rank_step(self) -> float:
        return self.ranks[0]["net_tx"] / self.world / self.steps

    @property
    def written_per_rank_step(self) -> float:
        return sum(r["written"] for r in self.ranks) / self.world / self.steps

    @property
    def rx_over_tx(self) -> float:
        return self.ranks[0]["net_rx"] / max(self.ranks[0]["net_tx"], 1)

    @property
    def comm_per_rank_step(self) -> dict[str, float] | None:
        """``comm_stats()`` bytes per step by kind, mean over ranks (None: the system has none)."""
        if self.ranks[0]["comm_per_step"] is None:
            return None
        keys = sorted({k for r in self.ranks for k in r["comm_per_step"]})
        return {k: sum(r["comm_per_step"].get(k, 0.0) for r in self.ranks) / self.world for k in keys}

    def counted_per_step(self, name: str) -> float | None:
        """A ``Built.counters`` count per step, summed over ranks (None: not counted)."""
        if name not in self.ranks[0]["counters_per_step"]:
            return None
        return sum(r["counters_per_step"][name] for r in self.ranks)

    def state_bytes(self, master: bool = True) -> int:
        """Optimizer-state bytes (with the master copy, or without), maximum over ranks."""
        return max(sum(v for k, v in r["state_parts"].items() if master or k != "master_params")
                   for r in self.ranks)

    @property
    def master_bytes(self) -> int:
        return max(r["state_parts"].get("master_params", 0) for r in self.ranks)

    @property
    def largest_state_parts(self) -> dict[str, int]:
        """``state_parts`` of the rank holding the most state."""
        return max((r["state_parts"] for r in self.ranks), key=lambda parts: sum(parts.values()))

    @property
    def peak_rss(self) -> int:
        return max(r["vm_hwm"] for r in self.ranks)

    @property
    def last_loss(self) -> float:
        """The last timed step's training loss, mean over ranks."""
        return statistics.fmean(r["losses"][-1] for r in self.ranks)

    @property
    def eval_loss(self) -> float:
        return self.ranks[0]["eval_loss"]

    @property
    def note(self) -> str:
        return self.ranks[0]["note"]


def run_ranks(worker: Callable[..., None], system: str, world: int, cfg: Config, prefix: str) -> Run:
    """One fresh spawn of ``world`` ranks running ``worker`` (which calls :func:`rank_main`)."""
    load_before = load_average()
    launched = time.time()
    ranks = spawn_ranks(worker, system, world, cfg, prefix)
    finished = time.time()
    wall = ranks[0]["wall"]
    phases = {
        "start": max(r["wall"]["entered"] for r in ranks) - launched,  # spawn + import
        "setup": wall["built"] - wall["entered"],  # process group, model, optimizer
        "warmup": wall["timed"] - wall["built"],
        "timed": wall["timed_end"] - wall["timed"],
        "after": wall["done"] - wall["timed_end"],  # profile, eval loss, sizes
        "total": finished - launched,
    }
    return Run(system, world, ranks, (load_before, load_average()), finished - launched, phases)


def run_all(systems: Sequence[str], world_sizes: Sequence[int], repeats: int,
            run_once: Callable[[str, int], Run], describe: Callable[[Run], str]) -> dict[int, dict[str, list[Run]]]:
    """Every system at every world size, ``repeats`` times interleaved; one progress line per run (stderr)."""
    results: dict[int, dict[str, list[Run]]] = {w: {s: [] for s in systems} for w in world_sizes}
    started = time.monotonic()
    width = max(len(s) for s in systems) + 1
    for repeat in range(repeats):
        for world in world_sizes:
            for system in systems:
                run = run_once(system, world)
                results[world][system].append(run)
                print(f"  repeat {repeat + 1}/{repeats} world {world} {system:<{width}} {describe(run)}, "
                      f"eval loss {run.eval_loss:.5f} (run {run.seconds:.0f} s, load average "
                      f"{run.load[0]:.1f} -> {run.load[1]:.1f})", file=sys.stderr, flush=True)
    print(f"total benchmark time {time.monotonic() - started:.0f} s", file=sys.stderr)
    return results
