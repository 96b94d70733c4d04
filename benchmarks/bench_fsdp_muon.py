"""Muon on FSDP2: shardopt's distributed Muon against torch.optim.Muon, ZeRO Muon and FSDP2 + AdamW.

Every system trains the byte-level GPT of ``examples/gpt_model.py``
(``PRESETS["bench"]`` by default, about 25.5M fp32 parameters; ``--preset``,
``--seq``) from the same seed on the same data (the standard-library corpus of
``harness.py``, windows drawn per step and rank), the same micro-batch per rank, on
gloo ranks on 127.0.0.1. Muon (lr 0.02, momentum 0.95, Nesterov, weight decay 0.1,
5 Newton-Schulz steps with Jordan's coefficients, the update scaled by
sqrt(max(1, rows/cols))) on the hidden matrices that ``shardopt.muon_param_groups``
picks (every ``blocks.*`` weight matrix); AdamW (lr 3e-4, betas (0.9, 0.95), eps
1e-8, weight decay 0.1) on the rest. No gradient clipping.

Newton-Schulz in fp32 by default (``--ns-dtype``): torch.optim.Muon always casts
to bf16, and CPU bf16 matmuls here are about 90x slower than fp32 ones (one
512 x 2048 iteration: 2.5 s against 28 ms, one thread), which would make the
benchmark measure the bf16 kernel. So in the fsdp2-torch-muon ranks, and only
there, the module attribute ``torch.optim._muon._zeropower_via_newtonschulz``
(which ``_single_tensor_muon`` looks up at call time) is replaced by the same
iteration in ``--ns-dtype`` (with bfloat16, torch's own function), run inside
``record_function("torch.newton_schulz")`` so its time can be read. shardopt is
never patched. Systems:

* ``fsdp2-shardopt-muon``: ``fully_shard`` on each block, then on the model (one
  1-D mesh over every rank); ``shardopt.Muon(shardopt.muon_param_groups(model), ...)``
  on the DTensor shards: each matrix orthogonalized once in the job, on an owner,
  shards there and back with two ``all_to_all_single``.
* ``fsdp2-torch-muon``: the same ``fully_shard``; ``torch.optim.Muon`` on the same
  matrices (it takes 2-D parameters only) and ``torch.optim.AdamW`` on the rest,
  stepped one after the other. DTensor redistributes inside every Newton-Schulz
  matmul; every rank orthogonalizes every matrix.
* ``zero-shardopt-muon``: ``shardopt.ZeroOptimizer(muon_param_groups, shardopt.Muon,
  stage=2)`` with every parameter whole on every rank (no FSDP2).
* ``fsdp2-shardopt-adamw``: the same ``fully_shard``; ``shardopt.AdamW`` on every
  parameter (lr 3e-4): what the optimizer step costs without Muon (no collective).

Measured per (system, world size) run (``harness.py``: a fresh spawn, ``--warmup``
untimed steps, ``--steps`` timed steps between barriers, ``torch.profiler`` over
them for every system):

* step ms, opt step ms: rank 0's forward + backward + step + zero_grad, and its
  ``step()`` alone; median over the timed steps, then over the repeats.
* opt-step KiB/rank/step: bytes this rank's process passed to write syscalls
  (``wchar`` of ``/proc/self/io``; gloo sends with writev) inside ``step()``, mean
  over ranks. ``lo`` counts every process's loopback bytes and cannot be cut at one
  rank's phase boundaries; wchar is per process. vs ideal: that / the ideal
  2 (W - 1) / W x this rank's Muon shard (mean over ranks) in the exchange dtype
  (the Newton-Schulz dtype), the bytes of sending each piece to its matrix's owner and back.
* step KiB/rank/step: ``lo`` tx bytes of ``/proc/net/dev`` over the timed window /
  world / steps (every byte gloo sends, plus other processes' loopback traffic).
* NS ms/rank: Newton-Schulz seconds per step per rank, from profiler ranges: the
  ``shardopt.matrix_transform`` range shardopt emits around each batch it
  orthogonalizes; for torch.optim.Muon, which emits none, the range the patch
  above adds (under DTensor the time includes the collectives inside). Median
  over steps, maximum over ranks. NS vs ideal: that / (zero-shardopt-muon's
  Newton-Schulz seconds summed over ranks / world): the 1/N share of orthogonalizing
  every matrix once.
* NS matrices/step: matrices orthogonalized per step, all ranks together (shardopt:
  one more step after the window, ``count_orthogonalized``).
* peak RSS MiB: VmHWM of ``/proc/self/status`` after the timed steps, maximum over
  ranks (per rank in the notes).
* eval loss: rank 0's loss on a fixed held-out batch after the steps;
  fsdp2-shardopt-muon and zero-shardopt-muon must agree within ``--loss-tol``.

Usage, from the repository root::

    python benchmarks/bench_fsdp_muon.py --world-sizes 2 --markdown
    python benchmarks/bench_fsdp_muon.py --world-sizes 2 --steps 2 --warmup 1 --repeats 1 --preset tiny
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import harness
import measure
import options
import profile_ranges
import report
import torch

# bench_muon.py's hyperparameters, so the two benchmarks train the same runs.
from bench_muon import ADAMW_KWARGS, ADAMW_LR, BETAS, EPS, MOMENTUM, MUON_KWARGS, MUON_LR, NS_STEPS, WEIGHT_DECAY
from harness import Run
from torch.profiler import ProfilerActivity, profile, record_function

import shardopt

DESCRIPTIONS = {
    "fsdp2-shardopt-muon": "fully_shard + shardopt.Muon(muon_param_groups) on the DTensor shards",
    "fsdp2-torch-muon": "fully_shard + torch.optim.Muon (hidden matrices) + torch.optim.AdamW (the rest)",
    "zero-shardopt-muon": "shardopt.ZeroOptimizer(muon_param_groups, shardopt.Muon, stage=2), parameters whole",
    "fsdp2-shardopt-adamw": "fully_shard + shardopt.AdamW on every parameter",
}
SYSTEMS = tuple(DESCRIPTIONS)
SAME_MATH = ("fsdp2-shardopt-muon", "zero-shardopt-muon")  # losses must agree
SHARDOPT_MUON = SAME_MATH
REFERENCE_NS = "zero-shardopt-muon"  # each matrix once, on whole parameters: the 1/N reference
TORCH_NS = "torch.newton_schulz"  # what torch.optim.Muon's Newton-Schulz function is timed as
NS_RANGES = (profile_ranges.MATRIX_TRANSFORM, TORCH_NS)
STEP_WRITTEN = "step_written"  # counter: bytes written inside step()
NS_MATRICES = "ns_matrices"
BUILT: list[harness.Built] = []  # this rank's system, for the step after the timed window


@dataclass(frozen=True)
class Config(harness.Config):
    ns_dtype: str = "float32"


# ---------------------------------------------------------------------- torch.optim.Muon only: its Newton-Schulz
# (the one patch here, in the fsdp2-torch-muon ranks only; the module docstring says why)


def patch_torch_newton_schulz(ns_dtype: str) -> None:
    """torch.optim.Muon's Newton-Schulz in ``ns_dtype``, inside a profiler range (this process only)."""
    from torch.optim import _muon

    original = _muon._zeropower_via_newtonschulz
    dtype = getattr(torch, ns_dtype)

    def iteration(grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                  eps: float) -> torch.Tensor:
        # torch's function line for line, with its .bfloat16() cast replaced by a copy in ``dtype``.
        a, b, c = ns_coefficients
        ortho = grad.to(dtype, copy=True)
        if grad.size(0) > grad.size(1):
            ortho = ortho.T
        ortho.div_(ortho.norm().clamp(min=eps))
        for _ in range(ns_steps):
            gram = ortho @ ortho.T
            update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            ortho = torch.addmm(ortho, update, ortho, beta=a)
        return ortho.T if grad.size(0) > grad.size(1) else ortho

    def ranged(grad: torch.Tensor, *args: Any) -> torch.Tensor:
        with record_function(TORCH_NS):
            return (original if dtype == torch.bfloat16 else iteration)(grad, *args)

    _muon._zeropower_via_newtonschulz = ranged


# ---------------------------------------------------------------------- systems


def fully_shard_model(model: torch.nn.Module) -> None:
    """FSDP2 over every rank: each block, then the root (embeddings, final norm, head)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def local_state_bytes(*optimizers: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's optimizer-state bytes by state name (DTensor states: their local shards)."""
    parts: dict[str, int] = {}
    for opt in optimizers:
        for entry in opt.state.values():
            for name, value in entry.items():
                if torch.is_tensor(value):
                    local = value.to_local() if hasattr(value, "to_local") else value
                    parts[name] = parts.get(name, 0) + local.numel() * local.element_size()
    return parts


class Stepped:
    """Several optimizers stepped as one (torch.optim.Muon takes matrices only)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad()


def count_step_bytes(built: harness.Built) -> harness.Built:
    """Counts the bytes this process writes (gloo's sends) inside ``step()``, as ``Built.counters``."""
    step, sent = built.step, [0]

    def counted() -> Any:
        before = measure.written_bytes()
        out = step()
        sent[0] += measure.written_bytes() - before
        return out

    built.step = counted
    built.counters = lambda: {STEP_WRITTEN: sent[0]}
    return built


def build(system: str, model: torch.nn.Module, cfg: Config) -> harness.Built:
    muon_kwargs = dict(MUON_KWARGS, ns_dtype=cfg.ns_dtype)
    if system == "zero-shardopt-muon":
        opt = shardopt.ZeroOptimizer(shardopt.muon_param_groups(model), shardopt.Muon, stage=2, **muon_kwargs)
        built = harness.built_zero(model, opt)
    elif system == "fsdp2-torch-muon":
        groups = shardopt.muon_param_groups(model)  # taken before fully_shard swaps in DTensors
        muon_names = {name for name, p in model.named_parameters()
                      if any(p is q for g in groups if g["use_muon"] for q in g["params"])}
        fully_shard_model(model)
        patch_torch_newton_schulz(cfg.ns_dtype)
        muon = [p for name, p in model.named_parameters() if name in muon_names]
        rest = [p for name, p in model.named_parameters() if name not in muon_names]
        opt_muon = torch.optim.Muon(muon, lr=MUON_LR, weight_decay=WEIGHT_DECAY, momentum=MOMENTUM, nesterov=True,
                                    ns_steps=NS_STEPS)
        opt_adamw = torch.optim.AdamW(rest, **ADAMW_KWARGS)
        stepped = Stepped(opt_muon, opt_adamw)
        built = harness.built_module(
            model, stepped, lambda: local_state_bytes(opt_muon, opt_adamw),
            note="local shards of torch.optim.Muon + AdamW states")
    else:
        fully_shard_model(model)
        if system == "fsdp2-shardopt-muon":
            opt = shardopt.Muon(shardopt.muon_param_groups(model), **muon_kwargs)
        elif system == "fsdp2-shardopt-adamw":
            opt = shardopt.AdamW(model.parameters(), **ADAMW_KWARGS)
        else:
            raise ValueError(system)
        built = harness.built_module(model, opt, lambda: local_state_bytes(opt),
                                     note="local shards of the optimizer's DTensor states")
    BUILT[:] = [count_step_bytes(built)]
    return BUILT[0]


def after_window(system: str, cfg: Config, tokens: torch.Tensor) -> dict[str, Any]:
    """Untimed: the matrices shardopt orthogonalizes in one more step, profiled."""
    out: dict[str, Any] = {}
    if system in SHARDOPT_MUON:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            BUILT[0].backward(BUILT[0].forward(tokens))
            BUILT[0].step()
        out["ns_matrices"] = shardopt.rules.muon.count_orthogonalized(prof.events())
    return out


def worker(rank: int, world: int, system: str, cfg: Config, run_dir: str) -> None:
    harness.rank_main(rank, world, system, cfg, run_dir, build, after=after_window)


# ---------------------------------------------------------------------- reporting


def ns_per_rank(run: Run) -> list[float]:
    """Median Newton-Schulz seconds per step, per rank."""
    return [report.median(profile_ranges.range_seconds(r["ranges"], NS_RANGES)) for r in run.ranks]


@dataclass
class Summary:
    """Medians over repeats of one system's per-run numbers."""

    step_ms: float
    opt_ms: float
    step_bytes: float  # written inside step(), mean over ranks, per step
    wire: float  # lo tx per rank per step, whole step
    ns_max_ms: float
    ns_total_ms: float
    ns_matrices: float | None
    rss: float
    rss_ranks: list[int]
    eval_loss: float


def summarize(runs: list[Run]) -> Summary:
    median = report.median
    ns = [ns_per_rank(r) for r in runs]
    matrices = [sum(x["ns_matrices"] for x in r.ranks) for r in runs if "ns_matrices" in r.ranks[0]]
    return Summary(
        step_ms=1e3 * median(median(r.step_times) for r in runs),
        opt_ms=1e3 * median(median(r.phase_times("step")) for r in runs),
        step_bytes=median(r.counted_per_step(STEP_WRITTEN) / r.world for r in runs),
        wire=median(r.wire_per_rank_step for r in runs),
        ns_max_ms=1e3 * median(max(n) for n in ns),
        ns_total_ms=1e3 * median(sum(n) for n in ns),
        ns_matrices=median(matrices) if matrices else None,
        rss=median(r.peak_rss for r in runs),
        rss_ranks=[r["vm_hwm"] for r in runs[0].ranks],
        eval_loss=runs[0].eval_loss,
    )


HEADER = ["system", "step ms", "opt step ms", "opt-step KiB/rank/step", "vs ideal", "step KiB/rank/step (lo)",
          "NS ms/rank (max)", "NS vs ideal 1/N", "NS matrices/step", "peak RSS MiB (max)",
          "step vs fsdp2-torch-muon", "eval loss"]


def table_rows(world: int, systems: Sequence[str], sums: dict[str, Summary], ideal_bytes: float
               ) -> list[list[str]]:
    ref_ns = sums[REFERENCE_NS].ns_total_ms / world if REFERENCE_NS in sums else None
    torch_step = sums["fsdp2-torch-muon"].step_ms if "fsdp2-torch-muon" in sums else None
    rows = []
    for system in systems:
        s = sums[system]
        muon = system != "fsdp2-shardopt-adamw"
        rows.append([
            system, f"{s.step_ms:.1f}", f"{s.opt_ms:.1f}", f"{s.step_bytes / 1024:.1f}",
            f"{s.step_bytes / ideal_bytes:.3f}" if muon else "-", f"{s.wire / 1024:.1f}",
            f"{s.ns_max_ms:.1f}" if muon else "-",
            f"{s.ns_max_ms / ref_ns:.2f}" if muon and ref_ns else "-",
            f"{s.ns_matrices:.0f}" if s.ns_matrices is not None else "-",
            report.mib(s.rss), f"{s.step_ms / torch_step:.2f}" if torch_step else "-", f"{s.eval_loss:.5f}",
        ])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = options.argument_parser(
        __doc__, SYSTEMS, timeout=900.0, batch_help="sequences per rank per step (default 1)",
        loss_tol_help=f"allowed |eval loss difference| between {' and '.join(SAME_MATH)} (default 1e-3)")
    parser.add_argument("--ns-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="Newton-Schulz dtype of every Muon here (default float32: the module docstring says why)")
    args = options.parse_args(parser, argv, SYSTEMS)
    systems, _ = options.prepare_run(args.threads, args.systems, ())
    cfg = Config(**options.config_from(args, NS_RANGES), ns_dtype=args.ns_dtype)
    gpt_config = cfg.model_config()
    torch.manual_seed(args.seed)
    model = harness.GPT(gpt_config)
    muon = [p for g in shardopt.muon_param_groups(model) if g["use_muon"] for p in g["params"]]
    muon_numel = sum(p.numel() for p in muon)
    versions, data, described = options.setup_lines(None, args.batch, gpt_config.seq_len, DESCRIPTIONS, systems)
    print(versions)
    print(f"model: harness.GPT(PRESETS[{args.preset!r}]) {gpt_config}, {harness.num_params(model):,} fp32 "
          f"parameters; Muon group: {len(muon)} matrices, {muon_numel:,} elements")
    del model
    print(data)
    print(f"Muon: lr {MUON_LR}, momentum {MOMENTUM} (Nesterov), weight_decay {WEIGHT_DECAY}, {NS_STEPS} "
          f"Newton-Schulz steps in {args.ns_dtype}; AdamW: lr {ADAMW_LR}, betas {BETAS}, eps {EPS}, weight_decay "
          f"{WEIGHT_DECAY}; no clipping; seed {args.seed}")
    print(f"method: each run = fresh spawn of `world` gloo ranks (127.0.0.1, FileStore), {args.threads} torch "
          f"thread(s) each, {args.warmup} warm-up + {args.steps} timed steps under torch.profiler (CPU); "
          f"{args.repeats} interleaved repeat(s) of [{', '.join(systems)}]")
    print(described)
    print(flush=True)

    results = harness.run_all(
        systems, args.world_sizes, args.repeats,
        lambda system, world: harness.run_ranks(worker, system, world, cfg, "bench_fsdp_muon_"),
        lambda run: f"step {1e3 * report.median(run.step_times):.1f} ms, opt step "
        f"{1e3 * report.median(run.phase_times('step')):.1f} ms")

    mismatches = 0
    bullet = "- " if args.markdown else ""
    for world in args.world_sizes:
        runs = results[world]
        sums = {s: summarize(runs[s]) for s in systems}
        # Each rank sends its pieces of the matrices others own and gets them back, in the
        # Newton-Schulz dtype: 2 (W - 1) / W of its shard (mean over ranks: 1/W of every matrix).
        ideal = 2 * (world - 1) / world * muon_numel / world * torch.finfo(getattr(torch, args.ns_dtype)).bits / 8
        print(f"\n{'### ' if args.markdown else ''}World size {world}\n")
        print(report.format_table(HEADER, table_rows(world, systems, sums, ideal), args.markdown))
        print()
        checked = [s for s in SAME_MATH if s in systems]
        notes, bad = report.check_losses(world, checked, runs, args.loss_tol,
                                          [s for s in systems if s not in checked] if checked else ())
        mismatches += bad
        notes.append(f"world {world}: ideal Muon exchange 2 (W-1)/W x local shard ({args.ns_dtype}) = "
                     f"{ideal / 1024:.1f} KiB/rank/step")
        for s in systems:
            ns = ns_per_rank(runs[s][0])
            if s != "fsdp2-shardopt-adamw":
                notes.append(f"world {world}: {s} NS ms/step per rank: {', '.join(f'{1e3 * t:.1f}' for t in ns)} "
                             f"(sum {1e3 * sum(ns):.1f}; max / mean {max(ns) / max(statistics.fmean(ns), 1e-12):.2f})")
            notes.append(f"world {world}: {s} peak RSS MiB per rank: "
                         + ", ".join(report.mib(b) for b in sums[s].rss_ranks)
                         + f"; optimizer state MiB (largest rank): {report.mib(runs[s][0].state_bytes())}")
        for note in notes:
            print(f"{bullet}{note}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
