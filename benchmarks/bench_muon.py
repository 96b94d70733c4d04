"""Compare distributed Muon implementations: shardopt's ZeRO Muon, "every rank does everything", DeepSpeed's.

Every system trains the same byte-level GPT (``examples/gpt_model.py``,
``PRESETS["bench"]`` by default, about 25.5M fp32 parameters; ``--preset``) from
the same seed on the same data (``bench_zero``'s corpus of standard-library
sources, windows drawn per step and rank) with the same micro-batch per rank, at
each world size of gloo ranks on 127.0.0.1. Hidden matrices (what
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
* ``shardopt-muon-z1``: the same with ``stage=1`` (all-reduced gradients, sharded states).
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
also keeps DeepSpeed's ``torch.compile``-decorated Muon eager so the timer below sees
every call). ``--warmup`` untimed steps, then ``--steps`` timed steps between two
barriers:

* opt step ms: rank 0's wall time of ``opt.step()`` (DeepSpeed: ``engine.step()``), median
  over the timed steps. step ms: rank 0's forward + backward + step + zero_grad.
* NS ms/rank (max): Newton-Schulz seconds per step on each rank, from a timer wrapped
  around the live rule object's ``transform`` (``opt.inner.muon_rule`` of a
  ZeroOptimizer, ``opt.muon_rule`` of ``shardopt.Muon``; an instance attribute, shardopt is
  not modified). For DeepSpeed the timer wraps the module attributes
  ``zeropower_via_newtonschulz5`` and ``zeropower_via_gram_newtonschulz`` of
  ``deepspeed.runtime.zero.muon.original_muon``, which its ``muon_update`` looks up at call
  time. Median over steps per rank, then the maximum over ranks.
* NS vs ideal: that maximum / (naive-muon's per-rank NS time / world size): 1.0 means the
  orthogonalization work is split perfectly over the ranks (only when naive-muon ran).
* NS matrices/step: matrices orthogonalized per step, summed over ranks
  (``muon_rule.num_orthogonalized`` deltas; for DeepSpeed the matrices passed to its
  Newton-Schulz functions). Equal to the model's matrix count when each is done once.
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

The whole set of systems is repeated ``--repeats`` times, interleaved (A B C ... A B C
...); the tables report medians over repeats. Ratios vs shardopt-muon: > 1 is slower.

Usage, from the repository root::

    python benchmarks/bench_muon.py --markdown                      # world sizes 2 and 4, all systems
    python benchmarks/bench_muon.py --markdown --ns-dtype bfloat16  # both sides' plain iteration in bf16
    python benchmarks/bench_muon.py --world-sizes 2 --steps 2 --warmup 1 --repeats 1 --preset tiny

DeepSpeed's ``init_distributed`` JIT-builds a shared-memory op on first use (about a
minute, cached in ``~/.cache/torch_extensions`` afterwards); only steps are timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# bench_zero (data, measurement and table helpers) lives next to this file; importing it
# also puts examples/ on sys.path for the model.
_BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
if _BENCHMARKS not in sys.path:
    sys.path.insert(0, _BENCHMARKS)

import bench_zero as bz  # noqa: E402
from gpt_model import GPT, PRESETS, GPTConfig, num_params  # noqa: E402

import shardopt  # noqa: E402

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
    "naive-muon": "DDP + shardopt.Muon on every rank (every rank orthogonalizes every matrix)",
    "ds-muon-z1": "DeepSpeed Muon (MuonWithAuxAdam, torch AdamW aux), ZeRO-1, fp32",
    "ds-muon-z2": "DeepSpeed Muon (MuonWithAuxAdam, torch AdamW aux), ZeRO-2, fp32",
    "shardopt-adamw": "shardopt.ZeroOptimizer(shardopt.AdamW, stage=2) on every parameter, no DDP",
}
SYSTEMS = tuple(DESCRIPTIONS)
DEEPSPEED_SYSTEMS = ("ds-muon-z1", "ds-muon-z2")
SAME_MATH = ("shardopt-muon", "shardopt-muon-z1", "naive-muon")  # losses must agree
MIXED_PRECISION_SYSTEMS = ("shardopt-muon", "shardopt-adamw")


@dataclass(frozen=True)
class Config:
    preset: str
    seq: int | None
    batch: int
    warmup: int
    steps: int
    threads: int
    seed: int
    timeout: float
    ns_dtype: str = "float32"

    def model_config(self) -> GPTConfig:
        base = PRESETS[self.preset]
        return dataclasses.replace(base, seq_len=self.seq) if self.seq else base


# ---------------------------------------------------------------------- Newton-Schulz timing


class NsTimer:
    """Wall time and matrix count of Newton-Schulz calls, through wrappers set on live objects."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._matrices = 0
        self.counter: Callable[[], int] = lambda: self._matrices

    def wrap(self, owner: Any, name: str, matrices: Callable[..., int] | None = None) -> None:
        """Replace ``owner.name`` by a timed call; ``matrices(*args)`` counts what one call orthogonalizes."""
        inner = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                if matrices is not None:
                    self._matrices += matrices(*args, **kwargs)

        # On an instance this shadows the method; on a module it replaces the global that
        # callers look up at call time.
        setattr(owner, name, timed)

    def wrap_rule(self, rule: Any) -> None:
        self.wrap(rule, "transform")
        self.counter = lambda: rule.num_orthogonalized


def _stacked_matrices(matrices: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return math.prod(matrices.shape[:-2])


# ---------------------------------------------------------------------- systems


@dataclass
class Built:
    """One system: the parts of a training step and what to read from it."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor], None]
    step: Callable[[], None]
    zero_grad: Callable[[], None]
    state_parts: Callable[[], dict[str, int]]
    ns: NsTimer | None = None
    comm_stats: Callable[[], dict[str, int]] | None = None
    note: str = ""


def _state_by_name(state: Any) -> dict[str, int]:
    """Bytes of a torch.optim ``state`` mapping (param -> dict), by state name."""
    parts: dict[str, int] = {}
    for entry in state.values():
        for name, value in entry.items():
            if torch.is_tensor(value):
                parts[name] = parts.get(name, 0) + value.numel() * value.element_size()
    return parts


def _zero_state_parts(opt: Any) -> dict[str, int]:
    report = opt.memory_report()
    return {"master_params": report["master_params"], **report["optimizer_states"]}


def _built_zero(model: torch.nn.Module, opt: Any, timer: NsTimer | None = None) -> Built:
    return Built(
        forward=lambda tokens: bz.lm_loss(model, tokens),
        backward=lambda loss: loss.backward(),
        step=opt.step,
        zero_grad=opt.zero_grad,
        state_parts=lambda: _zero_state_parts(opt),
        ns=timer,
        comm_stats=opt.comm_stats,
        note="memory_report(): master_params + optimizer_states",
    )


def build_shardopt_muon(model: torch.nn.Module, stage: int, ns_dtype: str) -> Built:
    opt = shardopt.ZeroOptimizer(shardopt.muon_param_groups(model), shardopt.Muon, stage=stage,
                                 **dict(MUON_KWARGS, ns_dtype=ns_dtype))
    timer = NsTimer()
    timer.wrap_rule(opt.inner.muon_rule)
    return _built_zero(model, opt, timer)


def build_shardopt_adamw(model: torch.nn.Module) -> Built:
    return _built_zero(model, shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, stage=2, **ADAMW_KWARGS))


def build_naive_muon(model: torch.nn.Module, ns_dtype: str) -> Built:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model)
    opt = shardopt.Muon(shardopt.muon_param_groups(ddp.module), **dict(MUON_KWARGS, ns_dtype=ns_dtype))
    timer = NsTimer()
    timer.wrap_rule(opt.muon_rule)
    return Built(
        forward=lambda tokens: bz.lm_loss(ddp, tokens),
        backward=lambda loss: loss.backward(),
        step=opt.step,
        zero_grad=opt.zero_grad,
        state_parts=lambda: _state_by_name(opt.state),
        ns=timer,
        note="tensors in shardopt.Muon.state (all of it, on every rank)",
    )


def deepspeed_ns_method(ns_dtype: str) -> tuple[str, torch.dtype]:
    """The ns_method whose Newton-Schulz runs in ``ns_dtype`` on this accelerator, preferring the plain iteration."""
    from deepspeed.runtime.zero.muon import original_muon

    wanted = getattr(torch, ns_dtype)
    for method in ("standard", "gram"):
        if original_muon.ns_compute_dtype(method) == wanted:
            return method, wanted
    return "gram", original_muon.ns_compute_dtype("gram")


def build_deepspeed_muon(model: torch.nn.Module, stage: int, batch: int, ns_dtype: str) -> Built:
    import deepspeed
    from deepspeed.runtime.zero.muon import original_muon

    groups = shardopt.muon_param_groups(model)
    muon_ids = {id(p) for group in groups for p in group["params"] if group["use_muon"]}
    for param in model.parameters():
        param.use_muon = id(param) in muon_ids
    ns_method, ns_dtype_used = deepspeed_ns_method(ns_dtype)
    config = {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "Muon",
            "params": {
                # muon_lr / adam_lr set each half's lr; the other keys go to the half that accepts them.
                "lr": MUON_LR, "muon_lr": MUON_LR, "adam_lr": ADAMW_LR, "momentum": MOMENTUM,
                "weight_decay": WEIGHT_DECAY, "betas": list(BETAS), "eps": EPS, "ns_method": ns_method,
                "torch_adam": True,
            },
        },
        "gradient_clipping": 0,
        "zero_optimization": {"stage": stage},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    differ = [n for n, p in model.named_parameters() if bool(getattr(p, "use_muon", False)) != (id(p) in muon_ids)]
    if differ:
        raise RuntimeError(f"DeepSpeed's Muon/AdamW split differs from shardopt.muon_param_groups' on {differ}")
    zero_opt = engine.optimizer  # DeepSpeedZeroOptimizer
    inner = zero_opt.optimizer  # MuonWithAuxAdam over this rank's flat fp32 partitions
    timer = NsTimer()
    timer.wrap(original_muon, "zeropower_via_newtonschulz5", _stacked_matrices)
    timer.wrap(original_muon, "zeropower_via_gram_newtonschulz", _stacked_matrices)

    def state_parts() -> dict[str, int]:
        parts = _state_by_name(inner.state)
        parts["master_params"] = bz.tensor_bytes(zero_opt.single_partition_of_fp32_groups)
        staged = getattr(zero_opt, "_muon_pending_momentum", {})
        parts["momentum staging copy"] = bz.tensor_bytes(entry[0] for entry in staged.values())
        return parts

    return Built(
        forward=lambda tokens: bz.lm_loss(engine, tokens),
        backward=lambda loss: engine.backward(loss),
        step=engine.step,
        zero_grad=lambda: None,  # engine.step() clears the gradients
        state_parts=state_parts,
        ns=timer,
        note=f"engine.optimizer.optimizer.state + single_partition_of_fp32_groups + _muon_pending_momentum; "
        f"ns_method {ns_method!r} in {str(ns_dtype_used).removeprefix('torch.')}",
    )


def build(system: str, model: torch.nn.Module, cfg: Config) -> Built:
    if system in ("shardopt-muon", "shardopt-muon-z1"):
        return build_shardopt_muon(model, stage=1 if system.endswith("z1") else 2, ns_dtype=cfg.ns_dtype)
    if system == "naive-muon":
        return build_naive_muon(model, cfg.ns_dtype)
    if system in DEEPSPEED_SYSTEMS:
        return build_deepspeed_muon(model, int(system[-1]), cfg.batch, cfg.ns_dtype)
    if system == "shardopt-adamw":
        return build_shardopt_adamw(model)
    raise ValueError(system)


def mixed_precision_state_bytes(system: str, cfg: Config, tokens: torch.Tensor) -> int:
    """master + optimizer-state bytes on this rank of a bf16 copy of the model after one step."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model_config()).to(torch.bfloat16)
    if system == "shardopt-muon":
        opt = shardopt.ZeroOptimizer(shardopt.muon_param_groups(model), shardopt.Muon, stage=2,
                                     precision=shardopt.PrecisionPolicy(), **MUON_KWARGS)
    else:
        opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, stage=2,
                                     precision=shardopt.PrecisionPolicy(), **ADAMW_KWARGS)
    bz.lm_loss(model, tokens).backward()
    opt.step()
    opt.zero_grad()
    report = opt.memory_report()
    return report["master_params"] + sum(report["optimizer_states"].values())


# ---------------------------------------------------------------------- one run (per rank)


def worker(rank: int, world: int, system: str, cfg: Config, run_dir: str) -> None:
    bz.run_logged(rank, run_dir, _worker, rank, world, system, cfg, run_dir)


def _worker(rank: int, world: int, system: str, cfg: Config, run_dir: str) -> None:
    bz.init_rank(rank, world, cfg.threads, run_dir, deepspeed=system in DEEPSPEED_SYSTEMS)

    torch.manual_seed(cfg.seed)
    gpt_config = cfg.model_config()
    model = GPT(gpt_config)
    built = build(system, model, cfg)
    tokens, _ = bz.corpus()
    seq = gpt_config.seq_len

    def data(step: int) -> torch.Tensor:
        return bz.batch_for(tokens, cfg.seed, step, rank, cfg.batch, seq)

    for step in range(cfg.warmup):
        loss = built.forward(data(step))
        built.backward(loss)
        built.step()
        built.zero_grad()

    comm_before = built.comm_stats() if built.comm_stats else {}
    ns_matrices_before = built.ns.counter() if built.ns else 0
    dist.barrier()
    net_before = bz.lo_bytes()
    step_times, opt_times, ns_times, ns_in_step, losses = [], [], [], [], []
    for step in range(cfg.warmup, cfg.warmup + cfg.steps):
        x = data(step)
        ns_before = built.ns.seconds if built.ns else 0.0
        start = time.perf_counter()
        loss = built.forward(x)
        built.backward(loss)
        ns_at_step = built.ns.seconds if built.ns else 0.0
        step_start = time.perf_counter()
        built.step()
        step_end = time.perf_counter()
        built.zero_grad()
        end = time.perf_counter()
        step_times.append(end - start)
        opt_times.append(step_end - step_start)
        if built.ns:
            ns_times.append(built.ns.seconds - ns_before)
            ns_in_step.append(built.ns.seconds - ns_at_step)
        losses.append(float(loss.detach()))
    dist.barrier()
    net_after = bz.lo_bytes()
    comm_after = built.comm_stats() if built.comm_stats else {}
    ns_matrices = (built.ns.counter() - ns_matrices_before) / cfg.steps if built.ns else None

    # Outside the measured window: the trained weights' loss on a fixed batch, then state sizes.
    eval_tokens = bz.batch_for(tokens, cfg.seed + 1, 0, 0, cfg.batch, seq)
    model.eval()
    with torch.no_grad():
        eval_loss = float(bz.lm_loss(model, eval_tokens))
    state_parts = built.state_parts()
    mixed = mixed_precision_state_bytes(system, cfg, data(0)) if system in MIXED_PRECISION_SYSTEMS else None

    result = {
        "rank": rank,
        "step_times": step_times,
        "opt_times": opt_times,
        "ns_seconds": statistics.median(ns_times) if built.ns else None,
        "ns_in_step_seconds": statistics.median(ns_in_step) if built.ns else None,
        "ns_matrices": ns_matrices,
        "losses": losses,
        "eval_loss": eval_loss,
        "net_tx": net_after[1] - net_before[1],
        "comm_per_step": {k: (comm_after[k] - comm_before.get(k, 0)) / cfg.steps for k in comm_after}
        if built.comm_stats else None,
        "state_parts": state_parts,
        "mixed_state_bytes": mixed,
        "note": built.note,
    }
    with open(os.path.join(run_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------- one run (parent)


@dataclass
class Run:
    system: str
    world: int
    step_times: list[float]  # rank 0's
    opt_times: list[float]  # rank 0's
    ns_per_rank: list[float] | None  # median NS seconds per step, per rank
    ns_in_step_per_rank: list[float] | None  # the part of it inside opt.step() / engine.step()
    ns_matrices: float | None  # per step, summed over ranks
    wire_per_rank_step: float
    comm_per_rank_step: dict[str, float] | None  # mean over ranks
    state_bytes: int  # max over ranks
    state_parts: dict[str, int]  # of the rank holding the most
    mixed_state_bytes: int | None  # max over ranks
    last_loss: float
    eval_loss: float
    note: str
    seconds: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)


def run_once(system: str, world: int, cfg: Config) -> Run:
    load_before = bz.load_average()
    launched = time.monotonic()
    ranks = bz.spawn_ranks(worker, system, world, cfg, "bench_muon_")
    zero = ranks[0]
    steps = len(zero["step_times"])
    totals = [sum(r["state_parts"].values()) for r in ranks]
    biggest = ranks[totals.index(max(totals))]
    comm = None
    if zero["comm_per_step"] is not None:
        keys = sorted({k for r in ranks for k in r["comm_per_step"]})
        comm = {k: sum(r["comm_per_step"].get(k, 0.0) for r in ranks) / world for k in keys}
    has_ns = zero["ns_seconds"] is not None
    mixed = [r["mixed_state_bytes"] for r in ranks if r["mixed_state_bytes"] is not None]
    return Run(
        system=system,
        world=world,
        step_times=zero["step_times"],
        opt_times=zero["opt_times"],
        ns_per_rank=[r["ns_seconds"] for r in ranks] if has_ns else None,
        ns_in_step_per_rank=[r["ns_in_step_seconds"] for r in ranks] if has_ns else None,
        ns_matrices=sum(r["ns_matrices"] for r in ranks) if has_ns else None,
        wire_per_rank_step=zero["net_tx"] / world / steps,
        comm_per_rank_step=comm,
        state_bytes=max(totals),
        state_parts=biggest["state_parts"],
        mixed_state_bytes=max(mixed) if mixed else None,
        last_loss=statistics.fmean(r["losses"][-1] for r in ranks),
        eval_loss=zero["eval_loss"],
        note=zero["note"],
        seconds=time.monotonic() - launched,
        load=(load_before, bz.load_average()),
    )


# ---------------------------------------------------------------------- reporting


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


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
    last_loss: float


def summarize(runs: list[Run]) -> Summary:
    ns = [r.ns_per_rank for r in runs if r.ns_per_rank is not None]
    comm = [sum(r.comm_per_rank_step.values()) for r in runs if r.comm_per_rank_step is not None]
    mixed = [r.mixed_state_bytes for r in runs if r.mixed_state_bytes is not None]
    return Summary(
        opt_ms=1e3 * _median([_median(r.opt_times) for r in runs]),
        step_ms=1e3 * _median([_median(r.step_times) for r in runs]),
        ns_max_ms=1e3 * _median([max(n) for n in ns]) if ns else None,
        ns_mean_ms=1e3 * _median([statistics.fmean(n) for n in ns]) if ns else None,
        ns_matrices=_median([r.ns_matrices for r in runs if r.ns_matrices is not None]) if ns else None,
        wire=_median([r.wire_per_rank_step for r in runs]),
        comm=_median(comm) if comm else None,
        state=_median([r.state_bytes for r in runs]),
        mixed=_median(mixed) if mixed else None,
        eval_loss=runs[0].eval_loss,
        last_loss=runs[0].last_loss,
    )


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
            bz.mib(s.wire),
            bz.mib(s.comm) if s.comm is not None else "-",
            bz.mib(s.state),
            ratio(s.step_ms, ref.step_ms if ref else None),
            ratio(s.opt_ms, ref.opt_ms if ref else None),
            f"{s.eval_loss:.5f}",
        ])
    return rows


def check_losses(world: int, systems: Sequence[str], runs: dict[str, list[Run]], tol: float) -> tuple[list[str], int]:
    """Eval losses of the same-math systems within ``tol`` of each other; the others only reported."""
    checked = [s for s in SAME_MATH if s in systems]
    if not checked:
        return [], 0
    base_system = checked[0]
    base = runs[base_system][0].eval_loss
    notes, mismatches, worst = [], 0, 0.0
    for system in checked:
        for run in runs[system]:
            diff = abs(run.eval_loss - base)
            worst = max(worst, diff)
            if diff > tol:
                mismatches += 1
                notes.append(f"world {world}: {system} eval loss {run.eval_loss:.6f} differs from "
                             f"{base_system}'s {base:.6f} by {diff:.2e} > {tol:.0e}")
    status = "MISMATCH" if mismatches else "ok"
    notes.insert(0, f"world {world}: eval losses of {', '.join(checked)} agree with {base_system}'s {base:.6f} "
                    f"to within {worst:.2e} (tolerance {tol:.0e}): {status}")
    others = [s for s in systems if s not in checked]
    if others:
        notes.append(f"world {world}: not checked (different math or precision), eval loss - {base_system}'s: "
                     + ", ".join(f"{s} {runs[s][0].eval_loss - base:+.2e}" for s in others))
    return notes, mismatches


def expected_mixed_ratio(model: torch.nn.Module) -> float:
    """Muon / AdamW master+state bytes from the parameter split: 8 vs 12 bytes per matrix element."""
    groups = shardopt.muon_param_groups(model)
    muon = sum(p.numel() for g in groups if g["use_muon"] for p in g["params"])
    total = sum(p.numel() for p in model.parameters())
    return (8 * muon + 12 * (total - muon)) / (12 * total)


# ---------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", default="2,4", help="comma-separated gloo world sizes (default 2,4)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from {', '.join(SYSTEMS)}")
    parser.add_argument("--preset", default="bench", choices=sorted(PRESETS), help="model preset (default bench)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (default 10)")
    parser.add_argument("--ns-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="Newton-Schulz dtype of shardopt; DeepSpeed takes its iteration that runs in it")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every system (default 3)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per rank per step (default 1)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the preset's seq_len)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    parser.add_argument("--loss-tol", type=float, default=1e-3,
                        help=f"allowed |eval loss difference| among {', '.join(SAME_MATH)} (default 1e-3)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per run (default 900)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="print GitHub markdown tables")
    args = bz.parse_common(parser, argv, SYSTEMS)
    if args.seq is not None and args.seq < 1:
        parser.error("--seq must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Eager everywhere (inherited by the ranks): DeepSpeed's Muon is torch.compile-decorated,
    # and the Newton-Schulz timer must see its calls.
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    systems, ds_version = bz.prepare_run(args.threads, args.systems, DEEPSPEED_SYSTEMS)

    cfg = Config(args.preset, args.seq, args.batch, args.warmup, args.steps, args.threads, args.seed, args.timeout,
                 args.ns_dtype)
    gpt_config = cfg.model_config()
    torch.manual_seed(args.seed)
    reference_model = GPT(gpt_config)
    n_params = num_params(reference_model)
    groups = shardopt.muon_param_groups(reference_model)
    muon_params = [p for g in groups if g["use_muon"] for p in g["params"]]
    mixed_expected = expected_mixed_ratio(reference_model)
    del reference_model
    _, corpus_note = bz.corpus()

    print(f"torch {torch.__version__}, deepspeed {ds_version or 'not used'}, python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs")
    print(f"model: GPT(PRESETS[{args.preset!r}]) {gpt_config}, {n_params:,} fp32 parameters; Muon group: "
          f"{len(muon_params)} matrices, {sum(p.numel() for p in muon_params):,} elements")
    print(f"data: {corpus_note}; micro-batch {args.batch} x {gpt_config.seq_len} tokens per rank per step")
    print(f"Muon: lr {MUON_LR}, momentum {MOMENTUM} (Nesterov), weight_decay {WEIGHT_DECAY}, {NS_STEPS} "
          f"Newton-Schulz steps (Jordan's coefficients), shardopt ns_dtype {args.ns_dtype}; AdamW half: lr {ADAMW_LR}, "
          f"betas {BETAS}, eps {EPS}, weight_decay {WEIGHT_DECAY}; shardopt-adamw: AdamW lr {ADAMW_LR} on all; "
          f"no clipping; seed {args.seed}")
    print(f"method: each run = fresh spawn of `world` gloo ranks (127.0.0.1, FileStore), {args.threads} torch "
          f"thread(s) each, {args.warmup} warm-up + {args.steps} timed steps; {args.repeats} interleaved "
          f"repeat(s) of [{', '.join(systems)}]")
    print("systems: " + "; ".join(f"{s} = {DESCRIPTIONS[s]}" for s in systems))
    print(flush=True)

    results: dict[int, dict[str, list[Run]]] = {w: {s: [] for s in systems} for w in args.world_sizes}
    started = time.monotonic()
    for repeat in range(args.repeats):
        for world in args.world_sizes:
            for system in systems:
                run = run_once(system, world, cfg)
                results[world][system].append(run)
                print(f"  repeat {repeat + 1}/{args.repeats} world {world} {system:<16} step "
                      f"{1e3 * _median(run.step_times):.1f} ms, opt step {1e3 * _median(run.opt_times):.1f} ms, "
                      f"eval loss {run.eval_loss:.5f} (run {run.seconds:.0f} s, load average "
                      f"{run.load[0]:.1f} -> {run.load[1]:.1f})", file=sys.stderr, flush=True)
    print(f"total benchmark time {time.monotonic() - started:.0f} s", file=sys.stderr)

    mismatches = 0
    bullet = "- " if args.markdown else ""
    heading = "### " if args.markdown else ""
    for world in args.world_sizes:
        runs = results[world]
        sums = {s: summarize(runs[s]) for s in systems}
        print(f"\n{heading}World size {world}\n")
        print(bz.format_table(HEADER, table_rows(world, systems, sums), args.markdown))
        print()
        notes, bad = check_losses(world, systems, runs, args.loss_tol)
        mismatches += bad
        for note in notes:
            print(f"{bullet}{note}")
        muon_mixed = sums["shardopt-muon"].mixed if "shardopt-muon" in sums else None
        adamw_mixed = sums["shardopt-adamw"].mixed if "shardopt-adamw" in sums else None
        if muon_mixed and adamw_mixed:
            print(f"{bullet}world {world}: mixed precision (bf16 params, PrecisionPolicy() fp32 master), master + "
                  f"optimizer states MiB/rank (max): shardopt-muon {bz.mib(muon_mixed)}, shardopt-adamw "
                  f"{bz.mib(adamw_mixed)}; Muon/AdamW ratio {muon_mixed / adamw_mixed:.3f} (expected from the "
                  f"parameter split, without padding: {mixed_expected:.3f})")
        else:
            print(f"{bullet}world {world}: mixed-precision Muon/AdamW state ratio: n/a (needs shardopt-muon and "
                  "shardopt-adamw)")
        for s in systems:
            comm = runs[s][0].comm_per_rank_step
            if comm:
                detail = ", ".join(f"{k} {bz.mib(v)}" for k, v in comm.items() if v)
                print(f"{bullet}world {world}: {s} comm_stats() MiB/rank/step: {detail or 'none'}")
        for s in systems:
            run = runs[s][0]
            detail = ", ".join(f"{k} {bz.mib(v)}" for k, v in run.state_parts.items() if v)
            print(f"{bullet}world {world}: {s} state MiB on its largest rank: {detail} ({run.note})")
        for s in systems:
            run = runs[s][0]
            if run.ns_per_rank and run.ns_in_step_per_rank:
                print(f"{bullet}world {world}: {s} NS ms/step per rank (of which inside the optimizer step): "
                      + ", ".join(f"{1e3 * t:.1f} ({1e3 * i:.1f})"
                                  for t, i in zip(run.ns_per_rank, run.ns_in_step_per_rank)))

    print(f"\nColumns: opt step = rank 0's opt.step() (DeepSpeed: engine.step(), which excludes its Newton-Schulz: "
          "that runs in engine.backward()); step = forward + backward + step + zero_grad; both median over the "
          "timed steps, then over repeats. NS ms/rank = Newton-Schulz time per step on each rank (median over "
          "steps), maximum over ranks; NS vs ideal = that / (naive-muon's mean per-rank NS time / world size). "
          "NS matrices/step = matrices orthogonalized per step, all ranks together. wire = lo tx bytes over the "
          "timed window / world / steps; comm_stats = shardopt's ring-model count, mean over ranks. state = "
          "optimizer states + separate master copy, maximum over ranks. Ratios vs "
          f"{REFERENCE}: > 1 is slower. eval loss = rank 0's model on a fixed held-out batch after the timed steps.")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
