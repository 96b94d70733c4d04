"""Compare shardopt's ZeRO-1/2 AdamW with DDP, torch's ZeroRedundancyOptimizer and DeepSpeed.

Every system trains the same byte-level GPT (``examples/gpt_model.py``,
``PRESETS["bench"]`` by default, about 25.5M fp32 parameters; ``--preset``,
``--seq``) from the same seed on the same data (bytes of Python's standard
library sources, windows drawn by a generator seeded per step and rank) with the
same AdamW hyperparameters (lr 3e-4, betas (0.9, 0.95), weight decay 0.1, eps
1e-8, no clipping), the same micro-batch per rank, at each world size of gloo
ranks on 127.0.0.1. Systems:

* ``shardopt-zero2``: ``shardopt.ZeroOptimizer(..., shardopt.AdamW, stage=2)``, no DDP
* ``shardopt-zero2-overlap``: the same with ``overlap_gather=True`` (the parameter
  all-gathers of a step are waited for by the next forward, layer by layer)
* ``shardopt-zero1``: the same with ``stage=1``
* ``ddp``: ``DistributedDataParallel`` + ``torch.optim.AdamW``
* ``torch-zero``: ``DistributedDataParallel`` + ``torch.distributed.optim.ZeroRedundancyOptimizer(AdamW)``
* ``ds-zero1`` / ``ds-zero2``: DeepSpeed ZeRO stage 1 / 2, fp32, ``torch.optim.AdamW``
  (``"torch_adam": true``), ``"gradient_clipping": 0``; skipped with a note when
  ``deepspeed`` is not importable

Every library keeps its defaults otherwise (bucket sizes, overlap; torch.optim.AdamW
picks its own CPU implementation). Each (system, world size) run is a fresh spawn
of ``world`` processes, each with ``torch.set_num_threads(--threads)``
(``harness.py`` holds the machinery shared with ``bench_muon.py``). In a run,
``--warmup`` steps come first (untimed); then, between two barriers, rank 0 reads
the ``lo`` byte counters of ``/proc/net/dev``, every rank reads its own
``wchar`` (bytes passed to write syscalls, /proc/self/io), and rank 0 times each
of the ``--steps`` steps (forward, backward, optimizer step, zero_grad), split
into those three parts (optimizer step includes zero_grad). gloo sends over TCP
on 127.0.0.1, so the ``lo`` tx delta counts every byte sent, once (DDP's C++
all-reduce included), but also any other process's loopback traffic; the ranks'
own ``wchar`` counts only theirs. Both are divided by world size and steps. The
whole set of systems is repeated ``--repeats`` times, interleaved (A B C ... A B
C ...); tables report medians across repeats. Losses after the timed steps must
agree across systems (exit status 1 otherwise).

``--profile`` runs ``torch.profiler`` (CPU activity) over the timed steps of every
system (so each pays its per-op cost) and splits shardopt's steps into parts from
the ``record_function`` ranges shardopt emits: ``shardopt.grad_copy`` (hook
copies into the buckets, which also allocate a bucket's buffer on its first
gradient), ``shardopt.reduce_launch`` (padding zeroed, reduction issued),
``shardopt.reduce_complete`` (waits for reductions), ``shardopt.reduce_wait``,
``shardopt.update`` (the AdamW rule and any master write-back),
``shardopt.all_gather`` and ``shardopt.gather_wait`` (the deferred waits of
``overlap_gather``, in the forward); each part is the time in its range outside the others,
per step, and what is left of backward (autograd compute) and of the optimizer
step (grad norm, stats all-reduce, reset) is shown as such. Nothing in shardopt
is wrapped. It also times gloo's collectives alone on a shardopt bucket and on a
model-sized buffer.

Usage, from the repository root::

    python benchmarks/bench_zero.py --markdown               # world sizes 2 and 4, all systems
    python benchmarks/bench_zero.py --world-sizes 2 --systems shardopt-zero2,ddp --repeats 1 --profile
    python benchmarks/bench_zero.py --world-sizes 2 --steps 2 --warmup 1 --repeats 1 --preset tiny

DeepSpeed's ``init_distributed`` JIT-builds a shared-memory op on first use
(about 50 s, cached in ``~/.cache/torch_extensions`` afterwards): run once
beforehand (``--systems ds-zero1 --world-sizes 2 --repeats 1 --steps 1``). Only
steps are timed, so it never enters the tables, but it lengthens the first run.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import harness
import measure
import options
import profile_ranges
import report
import torch
import torch.distributed as dist
from harness import GPT, Run, num_params
from profile_ranges import DURATION, OTHER
from report import mib

LR = 3e-4
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
EPS = 1e-8
ADAMW_KWARGS: dict[str, Any] = dict(lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS)
REFERENCE = "shardopt-zero2"

DESCRIPTIONS = {
    "shardopt-zero2": "shardopt.ZeroOptimizer(shardopt.AdamW, stage=2), no DDP",
    "shardopt-zero2-overlap": "shardopt.ZeroOptimizer(shardopt.AdamW, stage=2, overlap_gather=True), no DDP",
    "shardopt-zero1": "shardopt.ZeroOptimizer(shardopt.AdamW, stage=1), no DDP",
    "ddp": "DDP + torch.optim.AdamW",
    "torch-zero": "DDP + torch ZeroRedundancyOptimizer(torch.optim.AdamW)",
    "ds-zero1": "DeepSpeed ZeRO-1, fp32, torch.optim.AdamW (torch_adam)",
    "ds-zero2": "DeepSpeed ZeRO-2, fp32, torch.optim.AdamW (torch_adam)",
}
SYSTEMS = tuple(DESCRIPTIONS)
DEEPSPEED_SYSTEMS = ("ds-zero1", "ds-zero2")

# --profile: the shardopt ranges the breakdown reads; in step(), the first four are its wait for the reductions.
WAITS = (profile_ranges.REDUCE_WAIT, profile_ranges.REDUCE_COMPLETE, profile_ranges.REDUCE_LAUNCH,
         profile_ranges.GRAD_COPY)
RANGES = (*WAITS, profile_ranges.UPDATE, profile_ranges.ALL_GATHER, profile_ranges.GATHER_WAIT)


# ---------------------------------------------------------------------- systems


def build(system: str, model: torch.nn.Module, cfg: harness.Config) -> harness.Built:
    if system.startswith("shardopt-zero"):
        import shardopt

        stage, _, variant = system.removeprefix("shardopt-zero").partition("-")
        opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, stage=int(stage),
                                     overlap_gather=variant == "overlap", **ADAMW_KWARGS)
        return harness.built_zero(model, opt, note="memory_report(): optimizer_states (exp_avg, exp_avg_sq, step) "
                                  "and master_params")
    if system in ("ddp", "torch-zero"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model)
        if system == "torch-zero":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, **ADAMW_KWARGS)
            return harness.built_module(  # the state of this rank's shard only
                ddp, zero, lambda: measure.state_by_name(zero.optim.state),
                note="tensors in ZeroRedundancyOptimizer.optim.state (this rank's local AdamW)")
        opt = torch.optim.AdamW(model.parameters(), **ADAMW_KWARGS)
        return harness.built_module(ddp, opt, lambda: measure.state_by_name(opt.state), note="tensors in AdamW.state")
    if system in DEEPSPEED_SYSTEMS:
        params = {"lr": LR, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY, "eps": EPS, "torch_adam": True}
        return harness.built_deepspeed(
            model, int(system[-1]), cfg.batch, {"type": "AdamW", "params": params},
            "tensors in engine.optimizer.optimizer.state (AdamW over the fp32 partitions); "
            "master = engine.optimizer.single_partition_of_fp32_groups")
    raise ValueError(system)


def worker(rank: int, world: int, system: str, cfg: harness.Config, run_dir: str) -> None:
    harness.rank_main(rank, world, system, cfg, run_dir, build, deepspeed=system in DEEPSPEED_SYSTEMS)


def run_once(system: str, world: int, cfg: harness.Config) -> Run:
    return harness.run_ranks(worker, system, world, cfg, "bench_zero_")


# ---------------------------------------------------------------------- parts of a step


def step_parts(run: Run) -> dict[str, float]:
    """Rank 0's forward, backward and optimizer step (with zero_grad), median over steps."""
    return {
        "forward": report.median(run.phase_times("forward")),
        "backward": report.median(run.phase_times("backward")),
        "optimizer step": report.median(run.phase_times("step", "zero_grad")),
    }


def shardopt_breakdown(run: Run) -> dict[str, float] | None:
    """Rank 0's shardopt step split by its ranges (--profile), median over steps; None without them."""
    ranges = run.ranks[0]["ranges"]
    if not ranges or not run.system.startswith("shardopt"):
        return None

    def split(step: dict[str, dict[str, float]]) -> dict[str, float]:
        backward, opt = step["backward"], step["step"]
        return {
            "forward": step["forward"][DURATION],
            "forward: waits for parameter all-gathers (overlap_gather)": step["forward"].get(
                profile_ranges.GATHER_WAIT, 0.0),
            "backward: autograd compute": backward[OTHER],
            "backward: hook grad copies (+ bucket buffer alloc)": backward.get(profile_ranges.GRAD_COPY, 0.0),
            "backward: reduction launches (pad zero + issue)": backward.get(profile_ranges.REDUCE_LAUNCH, 0.0),
            "backward: waits for reductions": backward.get(profile_ranges.REDUCE_COMPLETE, 0.0),
            "step: waits for reductions": sum(opt.get(name, 0.0) for name in WAITS),
            "step: grad norm + stats all-reduce + reset": opt[OTHER],
            "step: AdamW rule update": opt.get(profile_ranges.UPDATE, 0.0),
            "step: all-gather (issue + wait; overlap_gather: issue)": opt.get(profile_ranges.ALL_GATHER, 0.0),
            "zero_grad": step["zero_grad"][DURATION],
        }

    splits = [split(step) for step in ranges]
    return {key: report.median(s[key] for s in splits) for key in splits[0]}


# ---------------------------------------------------------------------- gloo collectives alone (--profile)


def collectives_worker(rank: int, world: int, numels: list[int], cfg: harness.Config, run_dir: str) -> None:
    harness.run_logged(rank, run_dir, time_collectives, rank, world, numels, cfg, run_dir)


def time_collectives(rank: int, world: int, numels: list[int], cfg: harness.Config, run_dir: str) -> None:
    """Time gloo's collectives on buffers of ``numels`` fp32 elements; every rank writes the rows."""
    harness.init_rank(rank, world, cfg.threads, run_dir)
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
            before = measure.written_bytes()
            for _ in range(5):
                dist.barrier()
                start = time.perf_counter()
                op()
                times.append(time.perf_counter() - start)
            written = torch.tensor([measure.written_bytes() - before], dtype=torch.float64)
            dist.all_reduce(written)
            rows.append([name, numel * 4, statistics.median(times), float(written) / world / 5 / (numel * 4)])
    harness.finish_rank(rank, run_dir, rows)


def run_collectives(world: int, numels: list[int], cfg: harness.Config) -> list[list[Any]]:
    return harness.spawn_ranks(collectives_worker, numels, world, cfg, "bench_zero_")[0]


# ---------------------------------------------------------------------- reporting


TIME_HEADER = [
    "system", "median step s", "min step s", "per-repeat medians s", f"ratio vs {REFERENCE}",
    "CPU s/step (all ranks)", "CPU ratio", "opt state MiB/rank", "fp32 master copy MiB/rank", "peak RSS MiB (max rank)",
]
BYTES_HEADER = [
    "system", "wire (lo tx) MiB/step/rank", "wire / ideal", "wire / ideal, range", "rank writes MiB/step/rank",
    "rank writes / ideal", "comm_stats MiB/step/rank", "comm_stats / ideal", "last train loss", "eval loss",
]


def time_rows(systems: Sequence[str], runs: dict[str, list[Run]]) -> list[list[str]]:
    median = report.median
    medians = {s: median(median(r.step_times) for r in runs[s]) for s in systems}
    cpu = {s: median(r.cpu_per_step for r in runs[s]) for s in systems}
    reference = medians.get(REFERENCE)
    rows = []
    for system in systems:
        rs = runs[system]
        rows.append([
            system,
            f"{medians[system]:.3f}",
            f"{min(min(r.step_times) for r in rs):.3f}",
            ", ".join(f"{median(r.step_times):.3f}" for r in rs),
            f"{medians[system] / reference:.2f}" if reference else "-",
            f"{cpu[system]:.2f}",
            f"{cpu[system] / cpu[REFERENCE]:.2f}" if reference else "-",
            mib(median(r.state_bytes(master=False) for r in rs)),
            mib(median(r.master_bytes for r in rs)),
            f"{median(r.peak_rss for r in rs) / 2**20:.0f}",
        ])
    return rows


def bytes_rows(world: int, systems: Sequence[str], runs: dict[str, list[Run]], model_bytes: int) -> list[list[str]]:
    ideal = 2 * (world - 1) / world * model_bytes
    rows = []
    for system in systems:
        rs = runs[system]
        wire = [r.wire_per_rank_step for r in rs]
        written = report.median(r.written_per_rank_step for r in rs)
        comm_kinds = rs[0].comm_per_rank_step
        comm = sum(comm_kinds.values()) if comm_kinds else None
        rows.append([
            system,
            mib(report.median(wire)),
            f"{report.median(wire) / ideal:.3f}",
            f"{min(wire) / ideal:.3f}-{max(wire) / ideal:.3f}",
            mib(written),
            f"{written / ideal:.3f}",
            mib(comm) if comm is not None else "-",
            f"{comm / ideal:.3f}" if comm is not None else "-",
            f"{rs[0].last_loss:.5f}",
            f"{rs[0].eval_loss:.5f}",
        ])
    return rows


def parts_rows(systems: Sequence[str], parts: dict[str, list[dict[str, float]]],
               keys: Sequence[str]) -> list[list[str]]:
    """One row per system: the median over repeats of each part in ``keys``."""
    return [[s, *(f"{report.median(p[k] for p in parts[s]):.3f}" for k in keys)] for s in systems]


# ---------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = options.argument_parser(
        __doc__, SYSTEMS, timeout=600.0,
        batch_help="sequences per rank per step (default 1: keeps the default run near 10 min)",
        loss_tol_help="allowed |eval loss difference| (default 1e-3)")
    parser.add_argument("--profile", action="store_true",
                        help="also split shardopt's steps into parts (torch.profiler over shardopt's "
                        "record_function ranges) and time gloo's collectives on a shardopt bucket and on the whole "
                        "model")
    args = options.parse_args(parser, argv, SYSTEMS)
    systems, ds_version = options.prepare_run(args.threads, args.systems, DEEPSPEED_SYSTEMS)

    cfg = harness.Config(**options.config_from(args, RANGES if args.profile else ()))
    gpt_config = cfg.model_config()
    torch.manual_seed(args.seed)
    n_params = num_params(GPT(gpt_config))
    model_bytes = 4 * n_params
    versions, data, described = options.setup_lines(ds_version, args.batch, gpt_config.seq_len, DESCRIPTIONS, systems)

    print(versions)
    print(f"model: GPT(PRESETS[{args.preset!r}]) {gpt_config}, {n_params:,} fp32 parameters "
          f"({mib(model_bytes)} MiB)")
    print(data)
    print(f"AdamW lr {LR}, betas {BETAS}, weight_decay {WEIGHT_DECAY}, eps {EPS}, fp32, no clipping; seed {args.seed}")
    print(f"threads: torch.set_num_threads({args.threads}) and OMP_NUM_THREADS={args.threads} in every rank; "
          "gloo over 127.0.0.1 (GLOO_SOCKET_IFNAME=lo), FileStore rendezvous")
    print(f"method: each run = fresh spawn of `world` processes, {args.warmup} warm-up steps, {args.steps} timed "
          f"steps (rank 0's per-step wall time); {args.repeats} interleaved repeats of [{', '.join(systems)}]"
          + ("; torch.profiler (CPU) over the timed steps of every system (--profile)" if args.profile else ""))
    print(described)
    print(flush=True)

    results = harness.run_all(
        systems, args.world_sizes, args.repeats, lambda system, world: run_once(system, world, cfg),
        lambda run: f"median step {report.median(run.step_times):.3f} s, wire {mib(run.wire_per_rank_step)} "
        "MiB/step/rank")
    collectives: dict[int, list[list[Any]]] = {}
    if args.profile:
        from shardopt.zero.plan import DEFAULT_BUCKET_NUMEL

        for world in args.world_sizes:
            collectives[world] = run_collectives(world, [DEFAULT_BUCKET_NUMEL, n_params], cfg)

    mismatches = 0
    bullet = "- " if args.markdown else ""
    heading = "### " if args.markdown else ""
    for world in args.world_sizes:
        runs = results[world]
        ideal = 2 * (world - 1) / world * model_bytes
        print(f"\n{heading}World size {world}: step time and memory\n")
        print(report.format_table(TIME_HEADER, time_rows(systems, runs), args.markdown))
        parts = {s: [step_parts(r) for r in runs[s]] for s in systems}
        keys = list(parts[systems[0]][0])
        print(f"\n{heading}World size {world}: parts of a step, s (rank 0; median over steps, then repeats)\n")
        print(report.format_table(["system", *keys], parts_rows(systems, parts, keys), args.markdown))
        breakdowns = {s: [shardopt_breakdown(r) for r in runs[s]] for s in systems}
        profiled = [s for s in systems if breakdowns[s][0] is not None]
        if profiled:
            keys = list(breakdowns[profiled[0]][0])
            print(f"\n{heading}World size {world}: shardopt step breakdown, s (--profile)\n")
            columns = parts_rows(profiled, breakdowns, keys)
            rows = [[k, *(row[i + 1] for row in columns)] for i, k in enumerate(keys)]
            print(report.format_table(["part", *profiled], rows, args.markdown))
        if collectives.get(world):
            print(f"\n{heading}World size {world}: gloo collectives alone (median of 5, s; rank writes / buffer "
                  "bytes)\n")
            rows = [[name, mib(nbytes), f"{t:.3f}", f"{ratio:.3f}"] for name, nbytes, t, ratio in collectives[world]]
            print(report.format_table(["collective", "buffer MiB", "time s", "rank writes / buffer"], rows,
                                       args.markdown))
        print(f"\n{heading}World size {world}: bytes per step per rank (ideal 2(N-1)/N x model bytes = "
              f"{mib(ideal)} MiB) and losses\n")
        print(report.format_table(BYTES_HEADER, bytes_rows(world, systems, runs, model_bytes), args.markdown))
        print()
        checked = [REFERENCE, *(s for s in systems if s != REFERENCE)] if REFERENCE in systems else systems
        notes, bad = report.check_losses(world, checked, runs, args.loss_tol)
        mismatches += bad
        threads = sorted({r["threads"] for s in systems for run in runs[s] for r in run.ranks})
        rx = [run.rx_over_tx for s in systems for run in runs[s]]
        loads = [x for s in systems for run in runs[s] for x in run.load]
        notes.append(f"world {world}: torch threads per rank observed {threads}; "
                     f"lo rx/tx ratio {min(rx):.3f}-{max(rx):.3f}; 1-minute load average around the runs "
                     f"{min(loads):.1f}-{max(loads):.1f} ({os.cpu_count()} CPUs)")
        notes += report.comm_lines(world, systems, runs)
        for s in systems:
            detail = ", ".join(f"{k} {report.median(r.phases[k] for r in runs[s]):.1f}" for k in runs[s][0].phases)
            notes.append(f"world {world}: {s} run phases, median s: {detail}")
        for note in notes:
            print(f"{bullet}{note}")

    print(f"\nColumns: step time = rank 0's wall time of one timed step (forward, backward, optimizer step, "
          "zero_grad); median per run, then median over repeats; min = fastest single step of any repeat; per-repeat "
          f"medians in run order; ratio = median / {REFERENCE}'s median (> 1: slower). CPU s/step = CPU time "
          "of the rank processes (all threads, time.process_time) over the timed window / steps, summed over "
          "ranks, median over repeats: the work a step costs, less sensitive than wall time to other processes "
          "competing for the cores. opt state = "
          "optimizer-state tensors on one rank (max over ranks); fp32 master copy = a separate fp32 copy of "
          "the parameter partition, where the system keeps one. peak RSS = VmHWM, max over ranks. "
          "wire = lo tx bytes between the barriers around the timed steps / world / steps, median over repeats "
          "(includes other processes' loopback traffic, if any); rank writes = the ranks' own write-syscall "
          "bytes (/proc/self/io wchar) over the same window / world / steps; comm_stats = shardopt's own "
          "ring-model count per step, mean over ranks. eval loss = rank 0's model on a fixed held-out batch "
          "after the timed steps.")
    print("Counted as optimizer state: " + "; ".join(
        f"{s}: {results[args.world_sizes[0]][s][0].note}" for s in systems))
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
