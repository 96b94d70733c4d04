"""Compare distributed Muon implementations: shardopt's ZeRO Muon, "every rank does everything", DeepSpeed's.

Every system trains the same byte-level GPT (``examples/gpt_model.py``,
``PRESETS["bench"]`` by default, about 25.5M fp32 parameters; ``--preset``,
``--seq``) from the same seed on the same data (the standard-library corpus of
``harness.py``, shared with ``bench_zero.py``; windows drawn per step and rank)
with the same micro-batch per rank, at each world size of gloo ranks on 127.0.0.1. Hidden matrices (what
``shardopt.muon_param_groups`` puts in its Muon group: every ``blocks.*``
weight matrix) follow Muon with lr 0.02, momentum 0.95, Nesterov, weight decay
0.1, 5 Newton-Schulz steps with Jordan's coefficients in fp32 and the update
scaled by sqrt(max(1, rows/cols)); everything else (embeddings, output head,
norms, biases) follows AdamW with lr 3e-4, betas (0.9, 0.95), eps 1e-8, weight
decay 0.1. No gradient clipping. Systems:

* ``shardopt-muon``: ``shardopt.ZeroOptimizer(shardopt.muon_param_groups(model), shardopt.Muon,
  stage=2, ns_dtype="float32", ...)``, no DDP (the optimizer's hooks average the gradients).
  Each matrix is orthogonalized by one rank; the matrices cut by a rank boundary
  are exchanged (``comm_stats()["exchange"]``).
* ``shardopt-muon-z1``: the same with ``stage=1`` (all-reduced gradients, sharded states);
  ``shardopt-muon-auto``: with ``ns_method="auto"`` (Gram Newton-Schulz where faster).
* ``naive-muon``: ``DistributedDataParallel(model)`` + the single-process
  ``shardopt.Muon(shardopt.muon_param_groups(ddp.module), ...)`` on every rank: every
  rank orthogonalizes every matrix and keeps all of the state.
* ``ds-muon-z1`` / ``ds-muon-z2``: DeepSpeed's Muon (``{"type": "Muon"}``, its
  ``MuonWithAuxAdam``) at ZeRO stage 1 / 2, fp32, auxiliary AdamW = ``torch.optim.AdamW``
  (``"torch_adam": true``), ``"gradient_clipping": 0``. Parameters are tagged
  ``param.use_muon`` from ``shardopt.muon_param_groups`` before ``deepspeed.initialize``;
  DeepSpeed re-tags them by its own rule (matrices whose names lack "embed" and
  "lm_head"), and the run stops if the two splits differ. Skipped with a note
  when ``deepspeed`` is not importable.
* ``shardopt-adamw``: ``shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, stage=2)``
  for every parameter, lr 3e-4: the cost of Muon against plain ZeRO-2 AdamW.

DeepSpeed differences that its configuration cannot remove:

* Newton-Schulz: DeepSpeed's ``ns_method`` is ``"gram"`` (default) or ``"standard"``, and
  each picks its own dtype from the accelerator (``original_muon.ns_compute_dtype``): on
  the CPU accelerator "standard" always runs in bf16, "gram" in fp16 where oneDNN supports
  fp16, else fp32. The benchmark takes the first of "standard", "gram" that runs in fp32
  and prints the choice and its dtype (``--ns-dtype bfloat16``: the first that runs in bf16,
  "standard" on CPU, against shardopt's bf16 iteration: the same algorithm in the same
  dtype on both sides); "gram" (Dao's Gram Newton-Schulz, the same
  polynomial in exact arithmetic, iterating on X X^T with one restart, plain iteration for
  square matrices) rounds differently from shardopt's iteration. Where neither runs in fp32
  it falls back to "gram" in the accelerator's dtype, and the printed dtype says so.
* Normalisation before the iteration: DeepSpeed divides by ``||X||_F + 1e-7``,
  shardopt by ``max(||X||_F, 1e-7)``.
* The number of Newton-Schulz steps (5) and Nesterov momentum are fixed in DeepSpeed's
  ``muon_update``; both equal the settings used here.
* Muon and AdamW share one ``weight_decay`` in DeepSpeed's config; both halves use 0.1 here.
* DeepSpeed runs Newton-Schulz while filling the gradient partition at the end of
  ``engine.backward()`` (its ZeRO-1/2 epilogue), not in ``engine.step()``: its "opt step"
  column excludes Newton-Schulz, which lands in "step" (and in the NS column).

DeepSpeed's losses are reported but not checked against shardopt's; shardopt-muon,
shardopt-muon-z1 and naive-muon run the same math and must agree (below).

Measured per (system, world size) run, a fresh spawn of ``world`` processes
(``torch.set_num_threads(--threads)``, eager PyTorch: ``TORCHDYNAMO_DISABLE=1``, which
also keeps DeepSpeed's ``torch.compile``-decorated Muon eager so its Newton-Schulz calls
run as Python and can be marked, below). ``--warmup`` untimed steps, then ``--steps``
timed steps between two barriers, with ``torch.profiler`` (CPU activity) running over
them for every system (each pays the profiler's per-op cost):

* opt step ms: rank 0's wall time of ``opt.step()`` (DeepSpeed: ``engine.step()``), median
  over the timed steps. step ms: rank 0's forward + backward + step + zero_grad.
* NS ms/rank (max): Newton-Schulz seconds per step on each rank, read from the profiler.
  shardopt-muon(-z1), naive-muon: the ``record_function`` range ``shardopt.matrix_transform``
  that ZeroOptimizer's Muon step and single-process ``shardopt.Muon`` (``MatrixRule.update``)
  emit around each batch of matrices they orthogonalize.
  DeepSpeed emits no range: for the ds-muon systems only, and the one patch left
  in these benchmarks, the module attributes ``zeropower_via_newtonschulz5`` and
  ``zeropower_via_gram_newtonschulz`` of ``deepspeed.runtime.zero.muon.original_muon``
  (which its ``muon_update`` looks up at call time) are replaced in the rank processes
  by wrappers that run them inside ``record_function("deepspeed.newton_schulz")`` and
  count the matrices. shardopt is never wrapped. Median over steps per rank, then the
  maximum over ranks.
* NS vs ideal: that maximum / (naive-muon's per-rank NS time / world size): 1.0 means the
  orthogonalization work is split perfectly over the ranks (only when naive-muon ran).
* NS matrices/step: matrices orthogonalized per step, summed over ranks. shardopt: in one more
  step after the timed window, under its own profiler, from the range ``MuonRule.transform``
  names with the matrices of each Newton-Schulz call (``shardopt.newton_schulz 3x1024x256``);
  DeepSpeed: the matrices passed to its Newton-Schulz functions over the timed steps. Equal to
  the model's matrix count when each is done once.
* wire MiB/rank/step: ``lo`` tx bytes of ``/proc/net/dev`` over the timed window (rank 0
  reads it; includes every byte gloo sends over 127.0.0.1, and any other process's
  loopback traffic) / world / steps.
* comm_stats MiB/rank/step: shardopt's own ring-model byte count (``opt.comm_stats()``:
  reduce_scatter, reduce, all_gather, all_reduce, exchange) over the same window, mean
  over ranks / steps; the split by kind is printed under the table.
* state MiB/rank (max): optimizer state plus any separate master copy of the parameters,
  on each rank after the timed steps, maximum over ranks. shardopt:
  ``memory_report()["master_params"] + sum(memory_report()["optimizer_states"].values())``;
  naive-muon: every tensor in ``opt.state``; DeepSpeed: every tensor in
  ``engine.optimizer.optimizer.state`` (Muon momentum and AdamW states over its flat fp32
  partitions), its fp32 partitions (``single_partition_of_fp32_groups``) and the momentum
  staging copy it keeps per Muon group (``_muon_pending_momentum``). The parts are printed.
* mixed precision: for shardopt-muon and shardopt-adamw each rank also builds (untimed,
  after the timed steps) a bfloat16 copy of the model with ``precision=PrecisionPolicy()``
  (bf16 parameters, fp32 master weights and states), runs one step on one batch and
  records ``master_params + sum(optimizer_states)`` of ``memory_report()``. The summary
  prints the Muon / AdamW ratio: Muon keeps master + momentum (8 bytes per matrix
  element), AdamW master + two moments (12), so about 2/3 over the matrices; the
  embeddings and head stay AdamW in both, and the expected ratio from the parameter split
  is printed beside the measured one.
* losses: the last training loss (mean over ranks) and rank 0's loss on a fixed held-out
  batch after the timed steps (eval loss). shardopt-muon, shardopt-muon-z1 and naive-muon
  must agree within ``--loss-tol`` (1e-3); exit status 1 otherwise.

The systems repeat ``--repeats`` times, interleaved (A B C A B C ...); tables report
medians. Usage, from the repository root::

    python benchmarks/bench_muon.py --markdown                      # world sizes 2 and 4, all systems
    python benchmarks/bench_muon.py --markdown --ns-dtype bfloat16  # both sides' plain iteration in bf16
    python benchmarks/bench_muon.py --world-sizes 2 --steps 2 --warmup 1 --repeats 1 --preset tiny

DeepSpeed's ``init_distributed`` JIT-builds a shared-memory op on first use (about a
minute, cached in ``~/.cache/torch_extensions`` afterwards); only steps are timed."""
from __future__ import annotations

import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import harness
import measure
import options
import profile_ranges
import report
import torch
from harness import Run
from torch.profiler import ProfilerActivity, profile, record_function

import shardopt

MUON_LR = 0.02
MOMENTUM = 0.95
NS_STEPS = 5
ADAMW_LR = 3e-4
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
REFERENCE = "shardopt-muon"

# Keyword arguments of shardopt.Muon, shared by the sharded and the naive systems.
MUON_KWARGS: dict[str, Any] = dict(
    lr=MUON_LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY, ns_steps=NS_STEPS,
    ns_dtype="float32", adamw_lr=ADAMW_LR, adamw_betas=BETAS, adamw_eps=EPS, adamw_weight_decay=WEIGHT_DECAY,
)
ADAMW_KWARGS: dict[str, Any] = dict(lr=ADAMW_LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)

DESCRIPTIONS = {
    "shardopt-muon": "shardopt.ZeroOptimizer(muon_param_groups, shardopt.Muon, stage=2), no DDP",
    "shardopt-muon-z1": "shardopt.ZeroOptimizer(muon_param_groups, shardopt.Muon, stage=1), no DDP",
    "shardopt-muon-auto": "shardopt-muon with ns_method='auto' (Gram Newton-Schulz where it is faster)",
    "naive-muon": "DDP + shardopt.Muon on every rank (every rank orthogonalizes every matrix)",
    "ds-muon-z1": "DeepSpeed Muon (MuonWithAuxAdam, torch AdamW aux), ZeRO-1, fp32",
    "ds-muon-z2": "DeepSpeed Muon (MuonWithAuxAdam, torch AdamW aux), ZeRO-2, fp32",
    "shardopt-adamw": "shardopt.ZeroOptimizer(shardopt.AdamW, stage=2) on every parameter, no DDP",
}
SYSTEMS = tuple(DESCRIPTIONS)
DEEPSPEED_SYSTEMS = ("ds-muon-z1", "ds-muon-z2")
SAME_MATH = ("shardopt-muon", "shardopt-muon-z1", "naive-muon")  # losses must agree
MIXED_PRECISION_SYSTEMS = ("shardopt-muon", "shardopt-adamw")

DEEPSPEED_NS = "deepspeed.newton_schulz"  # the range the DeepSpeed-only patch below adds
NS_RANGES = (profile_ranges.MATRIX_TRANSFORM, DEEPSPEED_NS)
NS_MATRICES = "ns_matrices"  # the count of orthogonalized matrices
BUILT: list[harness.Built] = []  # this rank's system, for the step after the timed window


@dataclass(frozen=True)
class Config(harness.Config):
    ns_dtype: str = "float32"


# ---------------------------------------------------------------------- systems

def build_shardopt_muon(model: torch.nn.Module, stage: int, ns_dtype: str, ns_method: str) -> harness.Built:
    opt = shardopt.ZeroOptimizer(shardopt.muon_param_groups(model), shardopt.Muon, stage=stage,
                                 **dict(MUON_KWARGS, ns_dtype=ns_dtype, ns_method=ns_method))
    BUILT[:] = [harness.built_zero(model, opt)]
    return BUILT[0]


def build_naive_muon(model: torch.nn.Module, ns_dtype: str) -> harness.Built:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model)
    opt = shardopt.Muon(shardopt.muon_param_groups(ddp.module), **dict(MUON_KWARGS, ns_dtype=ns_dtype))
    BUILT[:] = [harness.built_module(ddp, opt, lambda: measure.state_by_name(opt.state),
                                     note="tensors in shardopt.Muon.state (all of it, on every rank)")]
    return BUILT[0]


# ---------------------------------------------------------------------- DeepSpeed only: a Newton-Schulz range
# (the one patch left in the benchmarks, in the ds-muon ranks only; the module docstring says what it does)


def mark_deepspeed_newton_schulz() -> Callable[[], dict[str, float]]:
    """Patch DeepSpeed's Newton-Schulz functions (this process only); returns the matrix counter."""
    from deepspeed.runtime.zero.muon import original_muon

    matrices = [0]

    def ranged(function: Callable[..., Any]) -> Callable[..., Any]:
        def call(stack: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            matrices[0] += math.prod(stack.shape[:-2])
            with record_function(DEEPSPEED_NS):
                return function(stack, *args, **kwargs)

        return call

    for name in ("zeropower_via_newtonschulz5", "zeropower_via_gram_newtonschulz"):
        setattr(original_muon, name, ranged(getattr(original_muon, name)))
    return lambda: {NS_MATRICES: matrices[0]}


def deepspeed_ns_method(ns_dtype: str) -> tuple[str, torch.dtype]:
    """The ns_method whose Newton-Schulz runs in ``ns_dtype`` on this accelerator, preferring the plain iteration."""
    from deepspeed.runtime.zero.muon import original_muon

    wanted = getattr(torch, ns_dtype)
    for method in ("standard", "gram"):
        if original_muon.ns_compute_dtype(method) == wanted:
            return method, wanted
    return "gram", original_muon.ns_compute_dtype("gram")


def build_deepspeed_muon(model: torch.nn.Module, stage: int, batch: int, ns_dtype: str) -> harness.Built:
    groups = shardopt.muon_param_groups(model)
    muon_ids = {id(p) for group in groups for p in group["params"] if group["use_muon"]}
    for param in model.parameters():
        param.use_muon = id(param) in muon_ids
    ns_method, ns_dtype_used = deepspeed_ns_method(ns_dtype)
    optimizer = {
        "type": "Muon",
        "params": {
            # muon_lr / adam_lr set each half's lr; the other keys go to the half that accepts them.
            "lr": MUON_LR, "muon_lr": MUON_LR, "adam_lr": ADAMW_LR, "momentum": MOMENTUM,
            "weight_decay": WEIGHT_DECAY, "betas": list(BETAS), "eps": EPS, "ns_method": ns_method,
            "torch_adam": True,
        },
    }
    built = harness.built_deepspeed(
        model, stage, batch, optimizer,
        f"engine.optimizer.optimizer.state + single_partition_of_fp32_groups + _muon_pending_momentum; "
        f"ns_method {ns_method!r} in {str(ns_dtype_used).removeprefix('torch.')}",
        counters=mark_deepspeed_newton_schulz())
    differ = [n for n, p in model.named_parameters() if bool(getattr(p, "use_muon", False)) != (id(p) in muon_ids)]
    if differ:
        raise RuntimeError(f"DeepSpeed's Muon/AdamW split differs from shardopt.muon_param_groups' on {differ}")
    return built


def build(system: str, model: torch.nn.Module, cfg: Config) -> harness.Built:
    if system.startswith("shardopt-muon"):
        return build_shardopt_muon(model, stage=1 if system.endswith("z1") else 2, ns_dtype=cfg.ns_dtype,
                                   ns_method="auto" if system.endswith("auto") else "standard")
    if system == "naive-muon":
        return build_naive_muon(model, cfg.ns_dtype)
    if system in DEEPSPEED_SYSTEMS:
        return build_deepspeed_muon(model, int(system[-1]), cfg.batch, cfg.ns_dtype)
    if system == "shardopt-adamw":
        opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, stage=2, **ADAMW_KWARGS)
        return harness.built_zero(model, opt)
    raise ValueError(system)


def after_window(system: str, cfg: Config, tokens: torch.Tensor) -> dict[str, Any]:
    """Untimed: the matrices shardopt orthogonalizes in one more step, profiled; mixed precision."""
    out: dict[str, Any] = {}
    if system in SAME_MATH:  # no Built.counters: the count goes where Run.counted_per_step reads it
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            BUILT[0].backward(BUILT[0].forward(tokens))
            BUILT[0].step()
        out["counters_per_step"] = {NS_MATRICES: shardopt.rules.muon.count_orthogonalized(prof.events())}
    return {**out, **mixed_precision_state(system, cfg, tokens)}


def mixed_precision_state(system: str, cfg: Config, tokens: torch.Tensor) -> dict[str, Any]:
    """master + optimizer-state bytes on this rank of a bf16 copy of the model after one step."""
    if system not in MIXED_PRECISION_SYSTEMS:
        return {"mixed_state_bytes": None}
    torch.manual_seed(cfg.seed)
    model = harness.GPT(cfg.model_config()).to(torch.bfloat16)
    if system == "shardopt-muon":
        opt = shardopt.ZeroOptimizer(shardopt.muon_param_groups(model), shardopt.Muon, stage=2,
                                     precision=shardopt.PrecisionPolicy(), **MUON_KWARGS)
    else:
        opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, stage=2,
                                     precision=shardopt.PrecisionPolicy(), **ADAMW_KWARGS)
    measure.lm_loss(model, tokens).backward()
    opt.step()
    opt.zero_grad()
    report = opt.memory_report()
    return {"mixed_state_bytes": report["master_params"] + sum(report["optimizer_states"].values())}


def worker(rank: int, world: int, system: str, cfg: Config, run_dir: str) -> None:
    harness.rank_main(rank, world, system, cfg, run_dir, build, deepspeed=system in DEEPSPEED_SYSTEMS,
                      after=after_window)


def run_once(system: str, world: int, cfg: Config) -> Run:
    return harness.run_ranks(worker, system, world, cfg, "bench_muon_")


# ---------------------------------------------------------------------- reporting


def ns_per_rank(run: Run, phases: Sequence[str] = profile_ranges.PHASES) -> list[float] | None:
    """Median Newton-Schulz seconds per step during ``phases``, per rank (None: not measured)."""
    if run.counted_per_step(NS_MATRICES) is None:
        return None
    return [report.median(profile_ranges.range_seconds(r["ranges"], NS_RANGES, phases)) for r in run.ranks]


@dataclass
class Summary:
    """Medians over repeats of one system's per-run numbers."""

    opt_ms: float
    step_ms: float
    ns_max_ms: float | None
    ns_mean_ms: float | None
    ns_matrices: float | None
    wire: float
    comm: float | None
    state: float
    mixed: float | None
    eval_loss: float


def summarize(runs: list[Run]) -> Summary:
    median = report.median
    ns = [n for n in (ns_per_rank(r) for r in runs) if n is not None]
    comm = [sum(r.comm_per_rank_step.values()) for r in runs if r.comm_per_rank_step is not None]
    mixed = [m for m in (max_or_none(r, "mixed_state_bytes") for r in runs) if m is not None]
    return Summary(
        opt_ms=1e3 * median(median(r.phase_times("step")) for r in runs),
        step_ms=1e3 * median(median(r.step_times) for r in runs),
        ns_max_ms=1e3 * median(max(n) for n in ns) if ns else None,
        ns_mean_ms=1e3 * median(statistics.fmean(n) for n in ns) if ns else None,
        ns_matrices=median(r.counted_per_step(NS_MATRICES) for r in runs) if ns else None,
        wire=median(r.wire_per_rank_step for r in runs),
        comm=median(comm) if comm else None,
        state=median(r.state_bytes() for r in runs),
        mixed=median(mixed) if mixed else None,
        eval_loss=runs[0].eval_loss,
    )


def max_or_none(run: Run, key: str) -> float | None:
    values = [r[key] for r in run.ranks if r.get(key) is not None]
    return max(values) if values else None


HEADER = [
    "system", "opt step ms (median)", "step ms", "NS ms/rank (max)", "NS vs ideal", "NS matrices/step",
    "wire MiB/rank/step", "comm_stats MiB/rank/step", "state MiB/rank (max)", f"step vs {REFERENCE}",
    f"opt step vs {REFERENCE}", "eval loss",
]


def table_rows(world: int, systems: Sequence[str], sums: dict[str, Summary]) -> list[list[str]]:
    naive = sums.get("naive-muon")
    ideal_ms = naive.ns_mean_ms / world if naive and naive.ns_mean_ms else None
    ref = sums.get(REFERENCE)

    def ratio(value: float, base: float | None) -> str:
        return f"{value / base:.2f}" if base else "-"

    rows = []
    for system in systems:
        s = sums[system]
        rows.append([
            system,
            f"{s.opt_ms:.1f}",
            f"{s.step_ms:.1f}",
            f"{s.ns_max_ms:.1f}" if s.ns_max_ms is not None else "n/a",
            ratio(s.ns_max_ms, ideal_ms) if s.ns_max_ms is not None else "n/a",
            f"{s.ns_matrices:.0f}" if s.ns_matrices is not None else "n/a",
            report.mib(s.wire),
            report.mib(s.comm) if s.comm is not None else "-",
            report.mib(s.state),
            ratio(s.step_ms, ref.step_ms if ref else None),
            ratio(s.opt_ms, ref.opt_ms if ref else None),
            f"{s.eval_loss:.5f}",
        ])
    return rows


def expected_mixed_ratio(model: torch.nn.Module) -> float:
    """Muon / AdamW master+state bytes from the parameter split: 8 vs 12 bytes per matrix element."""
    groups = shardopt.muon_param_groups(model)
    muon = sum(p.numel() for g in groups if g["use_muon"] for p in g["params"])
    total = sum(p.numel() for p in model.parameters())
    return (8 * muon + 12 * (total - muon)) / (12 * total)


# ---------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = options.argument_parser(
        __doc__, SYSTEMS, timeout=900.0, batch_help="sequences per rank per step (default 1)",
        loss_tol_help=f"allowed |eval loss difference| among {', '.join(SAME_MATH)} (default 1e-3)")
    parser.add_argument("--ns-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="Newton-Schulz dtype of shardopt; DeepSpeed takes its iteration that runs in it")
    args = options.parse_args(parser, argv, SYSTEMS)
    # Eager everywhere (inherited by the ranks): DeepSpeed's Muon is torch.compile-decorated,
    # and its Newton-Schulz range (the patch above) must see its calls.
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    systems, ds_version = options.prepare_run(args.threads, args.systems, DEEPSPEED_SYSTEMS)

    cfg = Config(**options.config_from(args, NS_RANGES), ns_dtype=args.ns_dtype)
    gpt_config = cfg.model_config()
    torch.manual_seed(args.seed)
    reference_model = harness.GPT(gpt_config)
    n_params = harness.num_params(reference_model)
    groups = shardopt.muon_param_groups(reference_model)
    muon_params = [p for g in groups if g["use_muon"] for p in g["params"]]
    mixed_expected = expected_mixed_ratio(reference_model)
    del reference_model
    versions, data, described = options.setup_lines(ds_version, args.batch, gpt_config.seq_len, DESCRIPTIONS, systems)

    print(versions)
    print(f"model: harness.GPT(PRESETS[{args.preset!r}]) {gpt_config}, {n_params:,} fp32 parameters; Muon group: "
          f"{len(muon_params)} matrices, {sum(p.numel() for p in muon_params):,} elements")
    print(data)
    print(f"Muon: lr {MUON_LR}, momentum {MOMENTUM} (Nesterov), weight_decay {WEIGHT_DECAY}, {NS_STEPS} "
          f"Newton-Schulz steps (Jordan's coefficients), shardopt ns_dtype {args.ns_dtype}; AdamW half: lr {ADAMW_LR}, "
          f"betas {BETAS}, eps {EPS}, weight_decay {WEIGHT_DECAY}; shardopt-adamw: AdamW lr {ADAMW_LR} on all; "
          f"no clipping; seed {args.seed}")
    print(f"method: each run = fresh spawn of `world` gloo ranks (127.0.0.1, FileStore), {args.threads} torch "
          f"thread(s) each, {args.warmup} warm-up + {args.steps} timed steps under torch.profiler (CPU); "
          f"{args.repeats} interleaved repeat(s) of [{', '.join(systems)}]")
    print(described)
    print(flush=True)

    results = harness.run_all(
        systems, args.world_sizes, args.repeats, lambda system, world: run_once(system, world, cfg),
        lambda run: f"step {1e3 * report.median(run.step_times):.1f} ms, opt step "
        f"{1e3 * report.median(run.phase_times('step')):.1f} ms")

    mismatches = 0
    bullet = "- " if args.markdown else ""
    heading = "### " if args.markdown else ""
    for world in args.world_sizes:
        runs = results[world]
        sums = {s: summarize(runs[s]) for s in systems}
        print(f"\n{heading}World size {world}\n")
        print(report.format_table(HEADER, table_rows(world, systems, sums), args.markdown))
        print()
        checked = [s for s in SAME_MATH if s in systems]
        notes, bad = report.check_losses(world, checked, runs, args.loss_tol,
                                          [s for s in systems if s not in checked] if checked else ())
        mismatches += bad
        muon_mixed = sums["shardopt-muon"].mixed if "shardopt-muon" in sums else None
        adamw_mixed = sums["shardopt-adamw"].mixed if "shardopt-adamw" in sums else None
        if muon_mixed and adamw_mixed:
            notes.append(f"world {world}: mixed precision (bf16 params, PrecisionPolicy() fp32 master), master + "
                         f"optimizer states MiB/rank (max): shardopt-muon {report.mib(muon_mixed)}, shardopt-adamw "
                         f"{report.mib(adamw_mixed)}; Muon/AdamW ratio {muon_mixed / adamw_mixed:.3f} (expected "
                         f"from the parameter split, without padding: {mixed_expected:.3f})")
        else:
            notes.append(f"world {world}: mixed-precision Muon/AdamW state ratio: n/a (needs shardopt-muon and "
                         "shardopt-adamw)")
        notes += report.comm_lines(world, systems, runs)
        for s in systems:
            run = runs[s][0]
            detail = ", ".join(f"{k} {report.mib(v)}" for k, v in run.largest_state_parts.items() if v)
            notes.append(f"world {world}: {s} state MiB on its largest rank: {detail} ({run.note})")
        for s in systems:
            total, in_step = ns_per_rank(runs[s][0]), ns_per_rank(runs[s][0], ("step",))
            if total and in_step:
                notes.append(f"world {world}: {s} NS ms/step per rank (of which inside the optimizer step): "
                             + ", ".join(f"{1e3 * t:.1f} ({1e3 * i:.1f})" for t, i in zip(total, in_step)))
        for note in notes:
            print(f"{bullet}{note}")

    print(f"\nColumns: opt step = rank 0's opt.step() (DeepSpeed: engine.step(), which excludes its Newton-Schulz: "
          "that runs in engine.backward()); step = forward + backward + step + zero_grad; both median over the "
          "timed steps, then over repeats, with torch.profiler running. NS ms/rank = Newton-Schulz time per step "
          "on each rank (profiler ranges, median over steps), maximum over ranks; NS vs ideal = that / "
          "(naive-muon's mean per-rank NS time / world size). NS matrices/step = matrices orthogonalized per "
          "step, all ranks together. wire = lo tx bytes over the timed window / world / steps; comm_stats = "
          "shardopt's ring-model count, mean over ranks. state = optimizer states + separate master copy, maximum "
          f"over ranks. Ratios vs {REFERENCE}: > 1 is slower. eval loss = rank 0's model on a fixed held-out batch "
          "after the timed steps.")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
