"""The memory planner: per-GPU bytes of ZeRO training, from the runtime's own plan and declarations.

:func:`estimate` lists the model's parameters with their real shapes (meta
tensors) in the order :class:`~shardopt.ZeroOptimizer` numbers them, forms the
param groups and rules the optimizer would (``muon_param_groups`` for Muon),
runs the same :func:`~shardopt.plan_shards`, and multiplies each rank's share of
the plan by the bytes of each :class:`~shardopt.StateSpec` the rule declares. There
is no table of bytes per parameter: a new rule or state is planned correctly
the day it is declared. For stages 1 and 2 the model-state bytes equal
``ZeroOptimizer.memory_report()`` exactly (``tests/test_memory.py`` checks it).
The plan accounting is in :mod:`shardopt.planner.accounting`; architectures
and presets in :mod:`shardopt.planner.architectures` and
:mod:`shardopt.planner.presets`.

Stages (Rajbhandari et al. 2020, "ZeRO", sections 3 and 5; K = state bytes):

* 0: no sharding; every rank holds what the plan at world size 1 holds
  (``(2 + 2 + K) psi`` in mixed precision).
* 1: optimizer states and master weights sharded (``P_os``, section 5.1).
* 2: gradients sharded too (``P_os+g``, 5.2); the runtime keeps up to
  ``policy.MAX_IN_FLIGHT + 1`` full-bucket gradient buffers during backward.
* 3: parameters sharded too (``P_os+g+p``, 5.3), as PyTorch's FSDP2
  (``fully_shard``, optionally on a dp x tp mesh) allocates it, with shardopt's
  optimizers stepping the DTensor shards: :mod:`shardopt.planner.fsdp` (padded
  dim-0 shards, no separate master copy, FSDP2's all-gather and reduce-scatter
  buffers); ``tests/test_planner_fsdp.py`` checks it against a real run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..muon_grouping import muon_param_groups
from ..rules.base import Granularity
from ..zero.plan import DEFAULT_BUCKET_NUMEL, ParamInfo, ShardPlan
from ..zero.schedule import window_numel
from . import activations as act
from . import fsdp, presets
from .accounting import (
    BACKENDS,
    PRECISIONS,
    Precision,
    RankBytes,
    _meta,
    choose,
    itemsize,
    param_infos,
    plan_rank_bytes,
)

GPUS = presets.GPUS
# The plan and the accounting do work per data-parallel rank (and Muon's matrix
# layout more than linear in it): beyond this the planner no longer answers in
# well under a second. It is also --max-dp's default.
MAX_DP = 4096
# A bare count is planned as 1-D tensors of bucket_numel elements, each its own
# bucket: beyond this many, two exact plans (of this many tensors and one fewer) are
# extrapolated linearly (tests/test_misuse_entry.py checks it equals the exact plan).
BARE_EXACT_TENSORS = 16


@dataclass(frozen=True)
class MemoryReport:
    """Per-GPU bytes of the busiest rank (largest total), with its context.

    ``rank`` is that rank; ``ranks`` every data-parallel rank of the busiest
    pipeline stage; ``activations`` the stage's activation bytes by component.
    """

    model: str
    total_params: int
    matrix_params: int
    optimizer: str
    precision: Precision
    zero_stage: int
    dp: int
    tp: int
    pp: int
    pipeline_stage: int
    rank: RankBytes
    ranks: tuple[RankBytes, ...]
    activations: Mapping[str, int]
    gpu: str
    gpu_bytes: int
    stage_params: int
    plan_world_size: int
    num_buckets: int
    notes: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    largest_bucket_numel: int = 0
    fsdp_groups: int = 0  # stage 3: fully_shard groups (units and the root)

    @property
    def total(self) -> int:
        return self.rank.total + sum(self.activations.values())

    @property
    def headroom_bytes(self) -> int:
        return self.gpu_bytes - self.total

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    def per_rank_bytes(self) -> dict[str, int]:
        r = self.rank
        return {"params": r.params, "grads": r.grads, "master_params": r.master_params,
                "optimizer_states": sum(r.optimizer_states.values()), "activations": sum(self.activations.values()),
                "buffers": sum(r.buffers.values()), "total": self.total}

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``--json``: the keys scripts rely on first, then the detail."""
        return {
            "total_params": self.total_params, "matrix_params": self.matrix_params,
            "per_rank_bytes": self.per_rank_bytes(), "fits": self.fits, "headroom_bytes": self.headroom_bytes,
            "gpu": self.gpu, "gpu_bytes": self.gpu_bytes, "model": self.model, "optimizer": self.optimizer,
            "precision": self.precision.name, "zero_stage": self.zero_stage, "dp": self.dp, "tp": self.tp,
            "pp": self.pp, "num_gpus": self.dp * self.tp * self.pp,
            "busiest": {"dp_rank": self.rank.rank, "pipeline_stage": self.pipeline_stage},
            "optimizer_states": dict(self.rank.optimizer_states), "activations": dict(self.activations),
            "buffers": dict(self.rank.buffers), "settings": dict(self.settings), "notes": list(self.notes),
            "num_buckets": self.num_buckets, "largest_bucket_numel": self.largest_bucket_numel,
            "fsdp_groups": self.fsdp_groups,
        }


# ------------------------------------------------------------------ estimate


def _matrix_numel(named: Sequence[tuple[str, tuple[int, ...], bool]]) -> int:
    groups = muon_param_groups(_meta(named, torch.float32))
    return sum(math.prod(shape) for _, kind, shape, _ in groups.placement if kind == "muon")


def estimate(
    model: str | int | Mapping[str, Any] | os.PathLike | nn.Module,
    *,
    optimizer: str = "adamw",
    precision: str | Precision = "mixed",
    zero_stage: int = 2,
    dp: int = 1,
    tp: int = 1,
    pp: int = 1,
    seq_len: int = 4096,
    micro_batch: int = 1,
    recompute: str = "selective",
    sequence_parallel: bool = False,
    gpu: str | int = "h100-80gb",
    bucket_numel: int = DEFAULT_BUCKET_NUMEL,
    hyperparameters: Mapping[str, Any] | None = None,
    grad_arrival: Sequence[str] | None = None,
    matrix_layout: str = "balanced",
    fsdp_units: Sequence[str] | None = None,
    backend: str = "nccl",
) -> MemoryReport:
    """Per-GPU memory of training ``model`` with ZeRO ``zero_stage`` over ``dp`` ranks.

    ``model``: a preset name (``shardopt.planner.presets.PRESETS``), a Hugging Face
    ``config.json`` path or dict, a bare parameter count (an int; planned as
    bucket-sized 1-D tensors, no activations), or an ``nn.Module`` (meta device
    is fine: only names, shapes and ``requires_grad`` are read; its ``config``
    attribute, if any, gives activations). ``precision``: ``fp32``, ``bf16``,
    ``mixed`` (bf16 params and grads, fp32 master and states) or a
    :class:`Precision`. ``tp``/``pp``: Megatron-style splits
    (:mod:`shardopt.planner.presets`); ``dp`` ranks shard each tp/pp rank's parameters.
    ``hyperparameters``: overrides for the rule (``{"amsgrad": True}``; Muon's
    apply to its matrix group). ``grad_arrival``: parameter names in the order
    their gradients complete, for the stage-2 window (default: assumed, see
    :func:`shardopt.planner.presets.backward_order`). ``matrix_layout``: Muon's
    layout, ``"balanced"`` or ``"whole"`` (:class:`~shardopt.ZeroOptimizer`).
    ``fsdp_units`` (stage 3): names of the modules given to ``fully_shard``
    before the root (default: each decoder layer of a preset or config; a
    module's root alone; each tensor of a bare count). ``backend``: the process
    group's, for the collectives' staging buffers (``"nccl"``: the chunked
    all-gather's; ``"gloo"``: the receive buffers of its all-to-all reductions).

    Example::

        r = estimate("llama2-70b", optimizer="muon", zero_stage=2, dp=64)
        r.per_rank_bytes()["total"], r.fits
    """
    precision = precision if isinstance(precision, Precision) else choose("precision", precision, PRECISIONS)
    act.check_recompute(recompute)
    choose("backend", backend, BACKENDS)
    for label, value in (("dp", dp), ("bucket_numel", bucket_numel)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {label}: {value!r} (expected an int >= 1)")
    if dp > MAX_DP:
        raise ValueError(f"Invalid dp: {dp:,} (the planner plans up to {MAX_DP:,} data-parallel ranks)")
    gpu_bytes = gpu if isinstance(gpu, int) and not isinstance(gpu, bool) else choose("gpu", gpu, GPUS)
    if _bare_tensors(model, tp, pp, bucket_numel) > BARE_EXACT_TENSORS:
        return _extrapolated(model, tp=tp, pp=pp, bucket_numel=bucket_numel, optimizer=optimizer,
                             precision=precision, zero_stage=zero_stage, dp=dp, seq_len=seq_len,
                             micro_batch=micro_batch, recompute=recompute, sequence_parallel=sequence_parallel,
                             gpu=gpu, hyperparameters=hyperparameters, grad_arrival=grad_arrival,
                             matrix_layout=matrix_layout, fsdp_units=fsdp_units, backend=backend)
    source = presets.model_params(model, tp=tp, pp=pp, bucket_numel=bucket_numel)
    arch, notes = source.arch, list(source.notes)
    if optimizer == "muon" and not source.has_shapes:
        raise ValueError("Invalid optimizer: muon needs parameter shapes (a preset, config.json or module), "
                         "not a bare parameter count")
    matrix_params = _matrix_numel(source.full) if source.has_shapes else 0

    best = None
    units: list[str] = []
    for stage, named in source.stages.items():
        infos, groups = param_infos(named, optimizer, precision.param, hyperparameters)
        arrival = _arrival(infos, named, arch, grad_arrival)
        if zero_stage == 3:
            names = [n for n, _, _ in named]
            units = list(fsdp_units) if fsdp_units is not None else (
                fsdp.default_units(names) if arch else [] if source.has_shapes else names)
            by_index = {info.index: info.name for info in infos}
            plan = None
            ranks = fsdp.fsdp_rank_bytes(named, optimizer, precision, dp, units, [by_index[i] for i in arrival],
                                         hyperparameters, source.full)
        else:
            plan, ranks = plan_rank_bytes(infos, groups, precision, zero_stage, dp, bucket_numel, arrival,
                                          matrix_layout, backend)
        acts = {} if arch is None else act.activation_bytes(
            arch, seq_len=seq_len, micro_batch=micro_batch, tp=tp, pp=pp, stage=stage,
            sequence_parallel=sequence_parallel, recompute=recompute)
        busiest = max(ranks, key=lambda r: (r.total, -r.rank))
        candidate = (busiest.total + sum(acts.values()), stage, busiest, ranks, acts, plan, infos, groups, arrival)
        if best is None or candidate[0] > best[0]:
            best = candidate
    _, stage, busiest, ranks, acts, plan, infos, groups, arrival = best
    if plan is None:
        notes.append(f"ZeRO-3 as FSDP2 fully_shard over dp={dp}: {len(units)} unit(s) and the root; "
                     "transient rows peak at different times, their sum bounds the joint peak (docs/planner.md)")
    else:
        notes += _plan_notes(plan, zero_stage)
    if plan is not None and zero_stage >= 2 and plan.world_size > 1:
        first, steady = (window_numel(plan, arrival, first_step=first_step) for first_step in (True, False))
        item = itemsize(precision.reduce)
        # Worth a note only where it could decide whether the job fits.
        if (first - steady) * item > 0.01 * busiest.total:
            notes.append(f"{optimizer} ZeRO-{zero_stage} dp={dp}: the first step launches gradient reductions in "
                         f"the plan's order, before every rank adopts rank 0's: its reduce window is "
                         f"{first * item / 1e9:.2f} GB, not {steady * item / 1e9:.2f} GB")
    settings = {"seq_len": seq_len, "micro_batch": micro_batch, "recompute": recompute,
                "sequence_parallel": sequence_parallel, "bucket_numel": bucket_numel,
                "matrix_layout": matrix_layout, "backend": backend,
                "specs": {type(rule).__name__: [s.name for s in rule.state_specs(hp)] for rule, hp in groups}}
    return MemoryReport(
        model=source.name, total_params=source.total_params, matrix_params=matrix_params, optimizer=optimizer,
        precision=precision, zero_stage=zero_stage, dp=dp, tp=tp, pp=pp, pipeline_stage=stage,
        rank=busiest, ranks=tuple(ranks), activations=acts,
        gpu=gpu if isinstance(gpu, str) else f"{gpu} bytes", gpu_bytes=gpu_bytes,
        stage_params=sum(i.numel for i in infos), plan_world_size=dp if plan is None else plan.world_size,
        num_buckets=0 if plan is None else len(plan.buckets), notes=tuple(notes), settings=settings,
        largest_bucket_numel=0 if plan is None else max((b.flat_numel for b in plan.buckets), default=0),
        fsdp_groups=len(units) + 1 if plan is None else 0,
    )


def _bare_tensors(model: Any, tp: Any, pp: Any, bucket_numel: int) -> int:
    """How many 1-D tensors a bare count is planned as (0 for anything else or invalid tp/pp)."""
    if isinstance(model, bool) or not isinstance(model, int) or model < 1:
        return 0
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (tp, pp)):
        return 0  # model_params names the bad value
    share = -(-model // (tp * pp))
    return -(-share // bucket_numel)


def _extrapolated(model: int, *, tp: int, pp: int, bucket_numel: int, grad_arrival: Sequence[str] | None,
                  fsdp_units: Sequence[str] | None = None, **options: Any) -> MemoryReport:
    """A bare count of ``n`` tensors, from exact plans of ``k - 1`` and ``k`` tensors.

    Each full tensor of a bare count is a bucket of its own, alike on every rank,
    so everything a rank holds grows by the same bytes per tensor, and the
    transients (reduce and gather windows: a few buckets) stop growing after a few:
    ``value(n) = value(k) + (n - k) * (value(k) - value(k - 1))``, with no
    list of ``n`` tensors (``--params 1e15`` is 10^8 of them).
    """
    if grad_arrival is not None or fsdp_units is not None:
        raise ValueError("Invalid grad_arrival/fsdp_units: a bare parameter count has no parameter names")
    share = -(-model // (tp * pp))
    n = -(-share // bucket_numel)
    tail = share - (n - 1) * bucket_numel  # the one partial tensor, planned first
    k = BARE_EXACT_TENSORS
    a, b = (estimate((m - 1) * bucket_numel + tail, bucket_numel=bucket_numel, **options) for m in (k - 1, k))
    steps = n - k

    def grow(x: int, y: int) -> int:
        return y + steps * (y - x)

    def grow_dict(x: Mapping[str, int], y: Mapping[str, int]) -> dict[str, int]:
        return {key: grow(x.get(key, 0), y.get(key, 0)) for key in {**x, **y}}

    ranks = tuple(
        RankBytes(rank=y.rank, params=grow(x.params, y.params), grads=grow(x.grads, y.grads),
                  master_params=grow(x.master_params, y.master_params),
                  optimizer_states=grow_dict(x.optimizer_states, y.optimizer_states),
                  buffers=grow_dict(x.buffers, y.buffers))
        for x, y in zip(a.ranks, b.ranks)
    )
    notes = [f"bare parameter count: planned as {n:,} 1-D tensors of bucket_numel elements (extrapolated from "
             f"exact plans of {k - 1} and {k}); no activations (give --model for shapes)"]
    if tp * pp > 1:
        notes.append(f"tp x pp = {tp * pp}: parameters assumed split evenly")
    return MemoryReport(
        model=f"{model:,} parameters", total_params=model, matrix_params=0, optimizer=b.optimizer,
        precision=b.precision, zero_stage=b.zero_stage, dp=b.dp, tp=tp, pp=pp, pipeline_stage=0,
        rank=max(ranks, key=lambda r: (r.total, -r.rank)), ranks=ranks, activations={}, gpu=b.gpu,
        gpu_bytes=b.gpu_bytes, stage_params=share, plan_world_size=b.plan_world_size,
        num_buckets=grow(a.num_buckets, b.num_buckets), notes=tuple(notes), settings=b.settings,
        largest_bucket_numel=b.largest_bucket_numel, fsdp_groups=grow(a.fsdp_groups, b.fsdp_groups),
    )


def _arrival(infos: Sequence[ParamInfo], named: Sequence[tuple[str, Any, bool]], arch: Any,
             given: Sequence[str] | None) -> list[int]:
    """Parameter indices in gradient-arrival order: given names, else assumed (see the notes)."""
    index = {info.name: info.index for info in infos}
    names = [n for n, _, _ in named]
    order = list(given) if given is not None else presets.backward_order(names) if arch else names[::-1]
    unknown = [n for n in order if n not in index and n not in names]
    if unknown:
        raise ValueError(f"Invalid grad_arrival: unknown parameter names {unknown[:3]}")
    return [index[n] for n in order if n in index]


def _plan_notes(plan: ShardPlan, zero_stage: int) -> list[str]:
    if plan.world_size == 1 or not any(s.granularity is Granularity.MATRIX for s in plan.storages):
        return []
    balance = plan.matrix_balance()
    # Named by stage: a sweep prints the notes of every configuration together.
    note = (f"Muon ZeRO-{zero_stage} ({plan.matrix_layout} layout) over {plan.world_size} ranks: state max/mean "
            f"{balance['state_max_over_mean']:.3f}, padding {100 * balance['padding_fraction']:.2f}% of the "
            f"matrices, Newton-Schulz max/mean {balance['ns_max_over_mean']:.3f} (one matrix alone: "
            f"{balance['ns_lower_bound']:.3f})")
    if balance["num_straddlers"]:
        note += (f"; {int(balance['num_straddlers'])} matrices cross rank boundaries, exchanged for "
                 f"Newton-Schulz: <= {int(balance['exchange_max_numel']):,} elements per rank per step")
    return [note]
