"""Compare shardopt's ZeRO-1/2 AdamW with DDP, torch's ZeroRedundancyOptimizer and DeepSpeed.

Every system trains the same byte-level GPT (``examples/gpt_model.py``,
``PRESETS["bench"]``, about 25.5M fp32 parameters) from the same seed on the same
data (bytes of Python's standard library sources, windows drawn by a generator
seeded per step and rank) with the same AdamW hyperparameters (lr 3e-4, betas
(0.9, 0.95), weight decay 0.1, eps 1e-8, no clipping), the same micro-batch per
rank, at each world size of gloo ranks on 127.0.0.1. Systems:

* ``shardopt-zero2``: ``shardopt.ZeroOptimizer(..., shardopt.AdamW, stage=2)``, no DDP
* ``shardopt-zero1``: the same with ``stage=1``
* ``ddp``: ``DistributedDataParallel`` + ``torch.optim.AdamW``
* ``torch-zero``: ``DistributedDataParallel`` + ``torch.distributed.optim.ZeroRedundancyOptimizer(AdamW)``
* ``ds-zero1`` / ``ds-zero2``: DeepSpeed ZeRO stage 1 / 2, fp32, ``torch.optim.AdamW``
  (``"torch_adam": true``), ``"gradient_clipping": 0``; skipped with a note when
  ``deepspeed`` is not importable

Every library keeps its defaults otherwise (bucket sizes, overlap; torch.optim.AdamW
picks its own CPU implementation). Each (system, world size) run is a fresh spawn
of ``world`` processes, each with ``torch.set_num_threads(--threads)``. In a run,
``--warmup`` steps come first (untimed); then, between two barriers, rank 0 reads
the ``lo`` byte counters of ``/proc/net/dev``, every rank reads its own
``wchar`` (bytes passed to write syscalls, /proc/self/io), and rank 0 times each
of the ``--steps`` steps (forward, backward, optimizer step, zero_grad), split
into those three parts. gloo sends over TCP on 127.0.0.1, so the ``lo`` tx delta
counts every byte sent, once (DDP's C++ all-reduce included), but also any other
process's loopback traffic; the ranks' own ``wchar`` counts only theirs. Both are
divided by world size and steps. The whole set of systems is repeated
``--repeats`` times, interleaved (A B C ... A B C ...); tables report medians
across repeats. Losses after the timed steps must agree across systems (exit
status 1 otherwise).

``--profile`` also splits shardopt's steps into parts (hook copies, bucket
allocation, reduction launches and waits, grad norm, rule update, all-gather)
with timers wrapped around methods of the live optimizer (shardopt itself is
not modified), and times gloo's collectives alone on a shardopt bucket and on a
model-sized buffer.

Usage, from the repository root::

    python benchmarks/bench_zero.py --markdown               # world sizes 2 and 4, all systems
    python benchmarks/bench_zero.py --world-sizes 2 --systems shardopt-zero2,ddp --repeats 1 --profile

DeepSpeed's ``init_distributed`` JIT-builds a shared-memory op on first use
(about 50 s, cached in ``~/.cache/torch_extensions`` afterwards): run once
beforehand (``--systems ds-zero1 --world-sizes 2 --repeats 1 --steps 1``). Only
steps are timed, so it never enters the tables, but it lengthens the first run.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import signal
import statistics
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

# The examples' model, found relative to this file (no installed package).
_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)

from gpt_model import GPT, PRESETS, num_params  # noqa: E402

LR = 3e-4
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
EPS = 1e-8
REFERENCE = "shardopt-zero2"

DESCRIPTIONS = {
    "shardopt-zero2": "shardopt.ZeroOptimizer(shardopt.AdamW, stage=2), no DDP",
    "shardopt-zero1": "shardopt.ZeroOptimizer(shardopt.AdamW, stage=1), no DDP",
    "ddp": "DDP + torch.optim.AdamW",
    "torch-zero": "DDP + torch ZeroRedundancyOptimizer(torch.optim.AdamW)",
    "ds-zero1": "DeepSpeed ZeRO-1, fp32, torch.optim.AdamW (torch_adam)",
    "ds-zero2": "DeepSpeed ZeRO-2, fp32, torch.optim.AdamW (torch_adam)",
}
SYSTEMS = tuple(DESCRIPTIONS)
DEEPSPEED_SYSTEMS = ("ds-zero1", "ds-zero2")


@dataclass(frozen=True)
class Config:
    batch: int
    warmup: int
    steps: int
    threads: int
    seed: int
    timeout: float
    profile: bool = False


# ---------------------------------------------------------------------- measurement


def lo_bytes() -> tuple[int, int]:
    """(rx, tx) byte counters of the loopback interface, from /proc/net/dev."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                fields = rest.split()
                return int(fields[0]), int(fields[8])
    raise RuntimeError("no 'lo' interface in /proc/net/dev")


def vm_hwm_bytes() -> int:
    """This process's peak resident set size (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def written_bytes() -> int:
    """Bytes this process (all threads) passed to write-like syscalls (``wchar`` of /proc/self/io).

    gloo's TCP transport sends with writev, so between two barriers this counts
    the bytes this rank put on its sockets (plus any file writes, none in the
    timed steps), unaffected by other processes' loopback traffic.
    """
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def torch_state_bytes(state: Any) -> int:
    """Bytes of every tensor in a torch.optim ``state`` mapping (param -> dict)."""
    return sum(tensor_bytes(s.values()) for s in state.values())


# ---------------------------------------------------------------------- data


def corpus() -> tuple[torch.Tensor, str]:
    """About 2 MB of bytes: the standard library's top-level .py files, sorted by name."""
    stdlib = sysconfig.get_paths()["stdlib"]
    chunks, total, used = [], 0, 0
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        used += 1
        if total >= 2_000_000:
            break
    data = b"".join(chunks)
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    version = sysconfig.get_python_version()
    return tokens, f"{len(data):,} bytes of {used} .py files of Python {version}'s standard library"


def batch_for(tokens: torch.Tensor, seed: int, step: int, rank: int, batch: int, seq: int) -> torch.Tensor:
    """(batch, seq + 1) windows at offsets drawn from a generator seeded by (seed, step, rank)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + rank)
    starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=gen)
    return torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()])


def lm_loss(forward: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    logits = forward(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


# ---------------------------------------------------------------------- systems


@dataclass
class Built:
    """One system, ready to train: the three parts of a step and its introspection."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor], None]
    update: Callable[[], None]
    state_bytes: Callable[[], int]
    master_bytes: Callable[[], int] = lambda: 0
    comm_stats: Callable[[], dict[str, int]] | None = None
    counted: str = ""
    optimizer: Any = None

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        loss = self.forward(tokens)
        self.backward(loss)
        self.update()
        return loss


def build_shardopt(model: torch.nn.Module, stage: int) -> Built:
    import shardopt

    opt = shardopt.ZeroOptimizer(
        model.parameters(), shardopt.AdamW, stage=stage, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS
    )

    def update() -> None:
        opt.step()
        opt.zero_grad()

    return Built(
        forward=lambda tokens: lm_loss(model, tokens),
        backward=lambda loss: loss.backward(),
        update=update,
        state_bytes=lambda: sum(opt.memory_report()["optimizer_states"].values()),
        master_bytes=lambda: opt.memory_report()["master_params"],
        comm_stats=opt.comm_stats,
        counted="memory_report(): optimizer_states (exp_avg, exp_avg_sq, step) and master_params",
        optimizer=opt,
    )


def build_ddp(model: torch.nn.Module, zero: bool) -> Built:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model)
    if zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt: torch.optim.Optimizer = ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=torch.optim.AdamW,
            lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS,
        )
        local_state = lambda: opt.optim.state  # noqa: E731  (this rank's shard only)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS)
        local_state = lambda: opt.state  # noqa: E731

    def update() -> None:
        opt.step()
        opt.zero_grad()

    where = "ZeroRedundancyOptimizer.optim.state (this rank's local AdamW)" if zero else "AdamW.state"
    return Built(
        forward=lambda tokens: lm_loss(ddp, tokens),
        backward=lambda loss: loss.backward(),
        update=update,
        state_bytes=lambda: torch_state_bytes(local_state()),
        counted=f"tensors in {where}",
        optimizer=opt,
    )


def build_deepspeed(model: torch.nn.Module, stage: int, batch: int) -> Built:
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": LR, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY, "eps": EPS, "torch_adam": True},
        },
        "gradient_clipping": 0,
        "zero_optimization": {"stage": stage},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    zero_opt = engine.optimizer  # DeepSpeedZeroOptimizer
    inner = zero_opt.optimizer  # torch.optim.AdamW over this rank's fp32 partitions

    return Built(
        forward=lambda tokens: lm_loss(engine, tokens),
        backward=lambda loss: engine.backward(loss),
        update=engine.step,
        state_bytes=lambda: torch_state_bytes(inner.state),
        master_bytes=lambda: tensor_bytes(zero_opt.single_partition_of_fp32_groups),
        counted="tensors in engine.optimizer.optimizer.state (AdamW over the fp32 partitions); "
        "master = engine.optimizer.single_partition_of_fp32_groups",
        optimizer=zero_opt,
    )


def build(system: str, model: torch.nn.Module, cfg: Config) -> Built:
    if system.startswith("shardopt-zero"):
        return build_shardopt(model, int(system[-1]))
    if system in ("ddp", "torch-zero"):
        return build_ddp(model, zero=system == "torch-zero")
    if system in DEEPSPEED_SYSTEMS:
        return build_deepspeed(model, int(system[-1]), cfg.batch)
    raise ValueError(system)


# ---------------------------------------------------------------------- profiling (--profile)


class Spans:
    """Wraps methods of live objects to time them: self time (nested wrapped calls excluded), first start, last end."""

    def __init__(self) -> None:
        self.self_time: dict[str, float] = {}
        self.first_start: dict[str, float] = {}
        self.last_end: dict[str, float] = {}
        self._children: list[float] = []  # time spent in wrapped calls nested in each open call

    def reset(self) -> None:
        self.self_time.clear()
        self.first_start.clear()
        self.last_end.clear()

    def wrap(self, obj: Any, name: str, label: str) -> bool:
        inner = getattr(obj, name, None)
        if inner is None:
            return False

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            self._children.append(0.0)
            try:
                return inner(*args, **kwargs)
            finally:
                end = time.perf_counter()
                nested = self._children.pop()
                if self._children:
                    self._children[-1] += end - start
                self.self_time[label] = self.self_time.get(label, 0.0) + end - start - nested
                self.first_start.setdefault(label, start)
                self.last_end[label] = end

        setattr(obj, name, timed)  # an instance attribute shadows the method
        return True


def instrument_shardopt(opt: Any) -> Spans:
    """Time the parts of a ZeroOptimizer step without editing shardopt (instance-level wrappers).

    Methods that a version of shardopt lacks are skipped; their time then shows
    in the enclosing part (autograd compute, or the step's phases).
    """
    spans = Spans()
    reducer = opt.reducer
    spans.wrap(reducer, "take_grad", "copy")
    for buffers in opt.buffers:
        spans.wrap(buffers, "ensure_grad_flat", "alloc")
    spans.wrap(reducer, "_launch", "launch")
    spans.wrap(reducer, "_complete", "wait")
    spans.wrap(reducer, "finish", "finish")
    spans.wrap(opt, "_apply_rules", "rules")
    spans.wrap(opt.comm, "all_reduce_sum", "stats")
    spans.wrap(reducer, "reset", "reset")
    return spans


def shardopt_breakdown(spans: Spans, backward_self: dict[str, float], t: dict[str, float]) -> dict[str, float]:
    """Split one step into shardopt's parts; ``backward_self`` is the self-time snapshot taken after backward."""
    parts = {
        "backward: hook grad copies": backward_self.get("copy", 0.0),
        "backward: bucket grad buffer alloc+zero": backward_self.get("alloc", 0.0),
        "backward: reduction launches (pad zero + issue)": backward_self.get("launch", 0.0),
        "backward: waits for reductions": backward_self.get("wait", 0.0) + backward_self.get("finish", 0.0),
    }
    backward = t["update_start"] - t["backward_start"]
    rules_start = spans.first_start.get("rules", t["update_start"])
    rules_end = spans.last_end.get("rules", rules_start)
    reset_start = spans.first_start.get("reset", t["update_end"])
    return {
        "forward": t["backward_start"] - t["forward_start"],
        "backward: autograd compute": backward - sum(parts.values()),
        **parts,
        "step: grad norm + stats all-reduce": rules_start - t["update_start"],
        "step: AdamW rule update": rules_end - rules_start,
        "step: all-gather (issue + wait)": reset_start - rules_end,
        "step: reset + zero_grad": t["update_end"] - reset_start,
    }


# ---------------------------------------------------------------------- one run (per rank)


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


def init_rank(rank: int, world: int, threads: int, run_dir: str, *, deepspeed: bool) -> None:
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


def worker(rank: int, world: int, system: str, cfg: Config, run_dir: str) -> None:
    run_logged(rank, run_dir, _worker, rank, world, system, cfg, run_dir, time.time())


def _worker(rank: int, world: int, system: str, cfg: Config, run_dir: str, entered: float) -> None:
    phases = {"entered": entered}
    init_rank(rank, world, cfg.threads, run_dir, deepspeed=system in DEEPSPEED_SYSTEMS)

    torch.manual_seed(cfg.seed)
    gpt_config = PRESETS["bench"]
    model = GPT(gpt_config)
    built = build(system, model, cfg)
    phases["built"] = time.time()
    tokens, _ = corpus()
    seq = gpt_config.seq_len

    def data(step: int) -> torch.Tensor:
        return batch_for(tokens, cfg.seed, step, rank, cfg.batch, seq)

    for step in range(cfg.warmup):
        built.step(data(step))

    comm_before = dict(built.comm_stats()) if built.comm_stats else {}
    dist.barrier()
    net_before = lo_bytes()
    written_before = written_bytes()
    cpu_before = time.process_time()  # this process's CPU time, all threads (gloo's included)
    spans = instrument_shardopt(built.optimizer) if cfg.profile and system.startswith("shardopt") else None
    phases["timed"] = time.time()
    times, losses = [], []
    parts: dict[str, list[float]] = {}
    for step in range(cfg.warmup, cfg.warmup + cfg.steps):
        x = data(step)
        if spans:
            spans.reset()
        t = {"forward_start": time.perf_counter()}
        loss = built.forward(x)
        t["backward_start"] = time.perf_counter()
        built.backward(loss)
        t["update_start"] = time.perf_counter()
        backward_self = dict(spans.self_time) if spans else {}
        built.update()
        t["update_end"] = time.perf_counter()
        times.append(t["update_end"] - t["forward_start"])
        losses.append(float(loss.detach()))
        split = {
            "forward": t["backward_start"] - t["forward_start"],
            "backward": t["update_start"] - t["backward_start"],
            "optimizer step": t["update_end"] - t["update_start"],
        }
        if spans:
            split.update(shardopt_breakdown(spans, backward_self, t))
        for key, value in split.items():
            parts.setdefault(key, []).append(value)
    dist.barrier()
    net_after = lo_bytes()
    written_after = written_bytes()
    cpu_after = time.process_time()
    phases["timed_end"] = time.time()
    comm_after = dict(built.comm_stats()) if built.comm_stats else {}

    # Outside the measured window: the loss of the trained weights on a fixed batch.
    eval_tokens = batch_for(tokens, cfg.seed + 1, 0, 0, cfg.batch, seq)
    model.eval()
    with torch.no_grad():
        eval_loss = float(lm_loss(model, eval_tokens))

    comm = {k: (comm_after.get(k, 0) - comm_before.get(k, 0)) / cfg.steps for k in comm_after}
    result = {
        "rank": rank,
        "times": times,
        "parts": parts,
        "losses": losses,
        "eval_loss": eval_loss,
        "net_rx": net_after[0] - net_before[0],
        "net_tx": net_after[1] - net_before[1],
        "written": written_after - written_before,
        "cpu": cpu_after - cpu_before,
        "comm_per_step": comm if built.comm_stats else None,
        "state_bytes": built.state_bytes(),
        "master_bytes": built.master_bytes(),
        "counted": built.counted,
        "vm_hwm": vm_hwm_bytes(),
        "threads": torch.get_num_threads(),
        "phases": {**phases, "done": time.time()},
    }
    with open(os.path.join(run_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------- gloo collectives alone (--profile)


def collectives_worker(rank: int, world: int, numels: list[int], cfg: Config, run_dir: str) -> None:
    """Time gloo's collectives on buffers of ``numels`` fp32 elements; rank 0 writes the results."""
    torch.set_num_threads(cfg.threads)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(run_dir, "store"), world),
                            rank=rank, world_size=world)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    rows = []
    for numel in numels:
        numel -= numel % world
        flat, region = torch.ones(numel), torch.ones(numel // world)
        ops = {
            "all_reduce SUM": lambda: dist.all_reduce(flat),  # noqa: B023
            "reduce_scatter_tensor AVG": lambda: reduce_scatter(region, flat, op=dist.ReduceOp.AVG),  # noqa: B023
            "all_gather_into_tensor": lambda: all_gather(flat, region),  # noqa: B023
            "broadcast": lambda: dist.broadcast(flat, src=0),  # noqa: B023
        }
        for name, op in ops.items():
            op()
            times = []
            dist.barrier()
            before = written_bytes()
            for _ in range(5):
                dist.barrier()
                start = time.perf_counter()
                op()
                times.append(time.perf_counter() - start)
            written = torch.tensor([written_bytes() - before], dtype=torch.float64)
            dist.all_reduce(written)
            rows.append([name, numel * 4, statistics.median(times), float(written) / world / 5 / (numel * 4)])
    if rank == 0:
        with open(os.path.join(run_dir, "collectives.json"), "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def run_collectives(world: int, numels: list[int], cfg: Config) -> list[list[Any]]:
    with tempfile.TemporaryDirectory(prefix="bench_zero_") as run_dir:
        mp.start_processes(collectives_worker, args=(world, numels, cfg, run_dir), nprocs=world,
                           join=True, start_method="spawn")
        with open(os.path.join(run_dir, "collectives.json")) as f:
            return json.load(f)




@dataclass
class Run:
    system: str
    world: int
    times: list[float]
    cpu_per_step: float  # CPU seconds per timed step, summed over ranks
    last_loss: float
    eval_loss: float
    wire_per_rank_step: float
    written_per_rank_step: float
    rx_over_tx: float
    comm_per_step: dict[str, float] | None
    state_bytes: int
    master_bytes: int
    peak_rss: int
    counted: str
    threads: list[int] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    parts: dict[str, float] = field(default_factory=dict)  # rank 0's median per part of a step
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before and after the run


# ---------------------------------------------------------------------- one run (parent)


def load_average() -> float:
    """The 1-minute load average (other processes on this machine compete for its cores)."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def spawn_ranks(worker: Callable[..., None], system: str, world: int, cfg: Any, prefix: str) -> list[dict]:
    """Run ``worker(rank, world, system, cfg, run_dir)`` on ``world`` spawned ranks; each rank's JSON.

    On an error, or past ``cfg.timeout`` seconds, every rank is killed and the
    tail of each rank's log printed.
    """
    with tempfile.TemporaryDirectory(prefix=prefix) as run_dir:
        ctx = mp.start_processes(
            worker, args=(world, system, cfg, run_dir), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + cfg.timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{system} at world size {world} ran past {cfg.timeout:.0f} s")
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
                    print(f"--- {system} world {world} rank {rank} log (tail) ---\n{tail}", file=sys.stderr)
            raise
        ranks = []
        for rank in range(world):
            with open(os.path.join(run_dir, f"rank{rank}.json")) as f:
                ranks.append(json.load(f))
    return ranks


def run_once(system: str, world: int, cfg: Config) -> Run:
    load_before = load_average()
    launched = time.time()
    ranks = spawn_ranks(worker, system, world, cfg, "bench_zero_")
    finished = time.time()
    zero = ranks[0]
    steps = len(zero["times"])
    ph = zero["phases"]
    phases = {
        "start": max(r["phases"]["entered"] for r in ranks) - launched,  # spawn + import
        "setup": ph["built"] - ph["entered"],  # process group, model, optimizer
        "warmup": ph["timed"] - ph["built"],
        "timed": ph["timed_end"] - ph["timed"],
        "after": ph["done"] - ph["timed_end"],  # eval loss, reports
        "total": finished - launched,
    }
    return Run(
        system=system,
        world=world,
        times=zero["times"],
        cpu_per_step=sum(r["cpu"] for r in ranks) / steps,
        last_loss=statistics.fmean(r["losses"][-1] for r in ranks),
        eval_loss=zero["eval_loss"],
        wire_per_rank_step=zero["net_tx"] / world / steps,
        written_per_rank_step=sum(r["written"] for r in ranks) / world / steps,
        rx_over_tx=zero["net_rx"] / max(zero["net_tx"], 1),
        comm_per_step=zero["comm_per_step"],
        state_bytes=max(r["state_bytes"] for r in ranks),
        master_bytes=max(r["master_bytes"] for r in ranks),
        peak_rss=max(r["vm_hwm"] for r in ranks),
        counted=zero["counted"],
        threads=[r["threads"] for r in ranks],
        phases=phases,
        parts={k: statistics.median(v) for k, v in zero["parts"].items()},
        load=(load_before, load_average()),
    )


# ---------------------------------------------------------------------- reporting


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


TIME_HEADER = [
    "system", "median step s", "min step s", "per-repeat medians s", f"ratio vs {REFERENCE}",
    "CPU s/step (all ranks)", "CPU ratio", "opt state MiB/rank", "fp32 master copy MiB/rank", "peak RSS MiB (max rank)",
]
BYTES_HEADER = [
    "system", "wire (lo tx) MiB/step/rank", "wire / ideal", "wire / ideal, range", "rank writes MiB/step/rank",
    "rank writes / ideal", "comm_stats MiB/step/rank", "comm_stats / ideal", "last train loss", "eval loss",
]


def time_rows(systems: Sequence[str], runs: dict[str, list[Run]]) -> list[list[str]]:
    medians = {s: statistics.median(statistics.median(r.times) for r in runs[s]) for s in systems}
    cpu = {s: statistics.median(r.cpu_per_step for r in runs[s]) for s in systems}
    reference = medians.get(REFERENCE)
    rows = []
    for system in systems:
        rs = runs[system]
        per_repeat = [statistics.median(r.times) for r in rs]
        rows.append([
            system,
            f"{medians[system]:.3f}",
            f"{min(min(r.times) for r in rs):.3f}",
            ", ".join(f"{t:.3f}" for t in per_repeat),
            f"{medians[system] / reference:.2f}" if reference else "-",
            f"{cpu[system]:.2f}",
            f"{cpu[system] / cpu[REFERENCE]:.2f}" if reference else "-",
            mib(statistics.median(r.state_bytes for r in rs)),
            mib(statistics.median(r.master_bytes for r in rs)),
            f"{statistics.median(r.peak_rss for r in rs) / 2**20:.0f}",
        ])
    return rows


def bytes_rows(world: int, systems: Sequence[str], runs: dict[str, list[Run]], model_bytes: int) -> list[list[str]]:
    ideal = 2 * (world - 1) / world * model_bytes
    rows = []
    for system in systems:
        rs = runs[system]
        wire = [r.wire_per_rank_step for r in rs]
        written = statistics.median(r.written_per_rank_step for r in rs)
        comm = sum(rs[0].comm_per_step.values()) if rs[0].comm_per_step else None
        rows.append([
            system,
            mib(statistics.median(wire)),
            f"{statistics.median(wire) / ideal:.3f}",
            f"{min(wire) / ideal:.3f}-{max(wire) / ideal:.3f}",
            mib(written),
            f"{written / ideal:.3f}",
            mib(comm) if comm is not None else "-",
            f"{comm / ideal:.3f}" if comm is not None else "-",
            f"{rs[0].last_loss:.5f}",
            f"{rs[0].eval_loss:.5f}",
        ])
    return rows


def parts_rows(systems: Sequence[str], runs: dict[str, list[Run]], keys: Sequence[str]) -> list[list[str]]:
    rows = []
    for system in systems:
        rs = runs[system]
        rows.append([system] + [
            f"{statistics.median(r.parts[k] for r in rs):.3f}" if k in rs[0].parts else "-" for k in keys
        ])
    return rows


def format_table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for index, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_losses(world: int, systems: Sequence[str], runs: dict[str, list[Run]], tol: float) -> list[str]:
    """Every run's eval loss within ``tol`` of the reference's: the same training happened."""
    base_system = REFERENCE if REFERENCE in systems else systems[0]
    base = runs[base_system][0].eval_loss
    notes = []
    worst = 0.0
    for system in systems:
        for run in runs[system]:
            diff = abs(run.eval_loss - base)
            worst = max(worst, diff)
            if diff > tol:
                notes.append(f"world {world}: {system} eval loss {run.eval_loss:.6f} differs from "
                             f"{base_system}'s {base:.6f} by {diff:.2e} > {tol:.0e}")
    status = "MISMATCH" if notes else "ok"
    notes.insert(0, f"world {world}: eval losses agree with {base_system}'s {base:.6f} to within "
                    f"{worst:.2e} (tolerance {tol:.0e}): {status}")
    return notes


# ---------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", default="2,4", help="comma-separated gloo world sizes (default 2,4)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {', '.join(SYSTEMS)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every system (default 3)")
    parser.add_argument("--batch", type=int, default=1,
                        help="sequences of 128 tokens per rank per step (default 1: keeps the default run near 10 min)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    parser.add_argument("--loss-tol", type=float, default=1e-3, help="allowed |eval loss difference| (default 1e-3)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per run (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--profile", action="store_true",
                        help="also split shardopt's steps into parts (instance-level timers) and time gloo's "
                        "collectives on a shardopt bucket and on the whole model")
    return parse_common(parser, argv, SYSTEMS)


def parse_common(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                 systems: Sequence[str]) -> argparse.Namespace:
    """Parse and check the options every benchmark here shares (world sizes, systems, counts)."""
    args = parser.parse_args(argv)
    args.world_sizes = [int(w) for w in args.world_sizes.split(",") if w]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in systems]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(systems)}")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.threads < 1:
        parser.error("--steps, --repeats, --batch, --threads must be >= 1 and --warmup >= 0")
    if any(w < 2 for w in args.world_sizes):
        parser.error("--world-sizes must all be >= 2")
    return args


def prepare_run(threads: int, systems: Sequence[str], deepspeed_systems: Sequence[str]) -> tuple[list[str], str | None]:
    """Environment the spawned ranks inherit, and the systems that can run: ``(systems, deepspeed version)``."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo traffic on 127.0.0.1 only
    systems = list(systems)
    ds_version = None
    if any(s in deepspeed_systems for s in systems):
        if importlib.util.find_spec("deepspeed") is None:
            print("note: deepspeed is not importable; skipping "
                  + ", ".join(s for s in systems if s in deepspeed_systems)
                  + " (pip install -e '.[deepspeed]')")
            systems = [s for s in systems if s not in deepspeed_systems]
        else:
            from importlib.metadata import version

            ds_version = version("deepspeed")
    if not systems:
        raise SystemExit("no systems to run")
    return systems, ds_version


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through run_once, which kills the ranks


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    systems, ds_version = prepare_run(args.threads, args.systems, DEEPSPEED_SYSTEMS)

    cfg = Config(args.batch, args.warmup, args.steps, args.threads, args.seed, args.timeout, args.profile)
    gpt_config = PRESETS["bench"]
    torch.manual_seed(args.seed)
    n_params = num_params(GPT(gpt_config))
    model_bytes = 4 * n_params
    _, corpus_note = corpus()

    print(f"torch {torch.__version__}, deepspeed {ds_version or 'not used'}, python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs")
    print(f"model: GPT(PRESETS['bench']) {gpt_config}, {n_params:,} fp32 parameters ({mib(model_bytes)} MiB)")
    print(f"data: {corpus_note}; micro-batch {args.batch} x {gpt_config.seq_len} tokens per rank per step")
    print(f"AdamW lr {LR}, betas {BETAS}, weight_decay {WEIGHT_DECAY}, eps {EPS}, fp32, no clipping; seed {args.seed}")
    print(f"threads: torch.set_num_threads({args.threads}) and OMP_NUM_THREADS={args.threads} in every rank; "
          "gloo over 127.0.0.1 (GLOO_SOCKET_IFNAME=lo), FileStore rendezvous")
    print(f"method: each run = fresh spawn of `world` processes, {args.warmup} warm-up steps, {args.steps} timed "
          f"steps (rank 0's per-step wall time); {args.repeats} interleaved repeats of [{', '.join(systems)}]")
    print("systems: " + "; ".join(f"{s} = {DESCRIPTIONS[s]}" for s in systems))
    print(flush=True)

    results: dict[int, dict[str, list[Run]]] = {w: {s: [] for s in systems} for w in args.world_sizes}
    started = time.monotonic()
    for repeat in range(args.repeats):
        for world in args.world_sizes:
            for system in systems:
                t0 = time.monotonic()
                run = run_once(system, world, cfg)
                results[world][system].append(run)
                print(f"  repeat {repeat + 1}/{args.repeats} world {world} {system:<15} median step "
                      f"{statistics.median(run.times):.3f} s, wire {mib(run.wire_per_rank_step)} MiB/step/rank, "
                      f"eval loss {run.eval_loss:.5f} (run {time.monotonic() - t0:.0f} s, load average "
                      f"{run.load[0]:.1f} -> {run.load[1]:.1f})",
                      file=sys.stderr, flush=True)
    collectives: dict[int, list[list[Any]]] = {}
    if args.profile:
        from shardopt.plan import DEFAULT_BUCKET_NUMEL

        for world in args.world_sizes:
            collectives[world] = run_collectives(world, [DEFAULT_BUCKET_NUMEL, n_params], cfg)
    print(f"total benchmark time {time.monotonic() - started:.0f} s", file=sys.stderr)

    mismatches = 0
    bullet = "- " if args.markdown else ""
    for world in args.world_sizes:
        runs = results[world]
        ideal = 2 * (world - 1) / world * model_bytes
        heading = "### " if args.markdown else ""
        print(f"\n{heading}World size {world}: step time and memory\n")
        print(format_table(TIME_HEADER, time_rows(systems, runs), args.markdown))
        keys = ["forward", "backward", "optimizer step"]
        print(f"\n{heading}World size {world}: parts of a step, s (rank 0; median over steps, then repeats)\n")
        print(format_table(["system", *keys], parts_rows(systems, runs, keys), args.markdown))
        profiled = [s for s in systems if len(runs[s][0].parts) > len(keys)]
        if profiled:
            keys = [k for k in runs[profiled[0]][0].parts if k not in ("backward", "optimizer step")]
            print(f"\n{heading}World size {world}: shardopt step breakdown, s (--profile)\n")
            header = ["part", *profiled]
            rows = [[k, *(row[i + 1] for row in parts_rows(profiled, runs, keys))] for i, k in enumerate(keys)]
            print(format_table(header, rows, args.markdown))
        if collectives.get(world):
            print(f"\n{heading}World size {world}: gloo collectives alone (median of 5, s; rank writes / buffer "
                  "bytes)\n")
            rows = [[name, mib(nbytes), f"{t:.3f}", f"{ratio:.3f}"] for name, nbytes, t, ratio in collectives[world]]
            print(format_table(["collective", "buffer MiB", "time s", "rank writes / buffer"], rows, args.markdown))
        print(f"\n{heading}World size {world}: bytes per step per rank (ideal 2(N-1)/N x model bytes = "
              f"{mib(ideal)} MiB) and losses\n")
        print(format_table(BYTES_HEADER, bytes_rows(world, systems, runs, model_bytes), args.markdown))
        print()
        notes = check_losses(world, systems, runs, args.loss_tol)
        mismatches += len(notes) - 1
        for note in notes:
            print(f"{bullet}{note}")
        threads = sorted({t for s in systems for r in runs[s] for t in r.threads})
        rx = [r.rx_over_tx for s in systems for r in runs[s]]
        loads = [x for s in systems for r in runs[s] for x in r.load]
        print(f"{bullet}world {world}: torch threads per rank observed {threads}; "
              f"lo rx/tx ratio {min(rx):.3f}-{max(rx):.3f}; 1-minute load average around the runs "
              f"{min(loads):.1f}-{max(loads):.1f} ({os.cpu_count()} CPUs)")
        for s in systems:
            comm = runs[s][0].comm_per_step
            if comm:
                detail = ", ".join(f"{k} {mib(v)}" for k, v in sorted(comm.items()) if v)
                print(f"{bullet}world {world}: {s} comm_stats() per step (MiB): {detail}")
        for s in systems:
            keys = runs[s][0].phases
            detail = ", ".join(f"{k} {statistics.median(r.phases[k] for r in runs[s]):.1f}" for k in keys)
            print(f"{bullet}world {world}: {s} run phases, median s: {detail}")

    print(f"\nColumns: step time = rank 0's wall time of one timed step (forward, backward, optimizer step); "
          "median per run, then median over repeats; min = fastest single step of any repeat; per-repeat "
          f"medians in run order; ratio = median / {REFERENCE}'s median (> 1: slower). CPU s/step = CPU time "
          "of the rank processes (all threads, time.process_time) over the timed window / steps, summed over "
          "ranks, median over repeats: the work a step costs, less sensitive than wall time to other processes "
          "competing for the cores. opt state = "
          "optimizer-state tensors on one rank (max over ranks); fp32 master copy = a separate fp32 copy of "
          "the parameter partition, where the system keeps one. peak RSS = VmHWM, max over ranks. "
          "wire = lo tx bytes between the barriers around the timed steps / world / steps, median over repeats "
          "(includes other processes' loopback traffic, if any); rank writes = the ranks' own write-syscall "
          "bytes (/proc/self/io wchar) over the same window / world / steps; comm_stats = shardopt's own "
          "ring-model count per step. eval loss = rank 0's model on a fixed held-out batch after the timed steps.")
    print("Counted as optimizer state: " + "; ".join(
        f"{s}: {results[args.world_sizes[0]][s][0].counted}" for s in systems))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
