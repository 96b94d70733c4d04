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
* 3: parameters sharded too (``P_os+g+p``, 5.3), which shardopt's runtime does
  not implement; modelled as each rank keeping its region of each bucket and
  all-gathering up to ``MAX_IN_FLIGHT + 1`` buckets around their use (the
  gather window, under ``buffers``), as FSDP and DeepSpeed's prefetch limit do.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..muon_optimizer import muon_param_groups
from ..zero.plan import DEFAULT_BUCKET_NUMEL, ParamInfo, ShardPlan
from ..zero.schedule import window_numel
from . import activations as act
from . import presets
from .accounting import (
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

    Example::

        r = estimate("llama2-70b", optimizer="muon", zero_stage=2, dp=64)
        r.per_rank_bytes()["total"], r.fits
    """
    precision = precision if isinstance(precision, Precision) else choose("precision", precision, PRECISIONS)
    act.check_recompute(recompute)
    for label, value in (("dp", dp), ("bucket_numel", bucket_numel)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {label}: {value!r} (expected an int >= 1)")
    gpu_bytes = gpu if isinstance(gpu, int) and not isinstance(gpu, bool) else choose("gpu", gpu, GPUS)
    source = presets.model_params(model, tp=tp, pp=pp, bucket_numel=bucket_numel)
    arch, notes = source.arch, list(source.notes)
    if optimizer == "muon" and not source.has_shapes:
        raise ValueError("Invalid optimizer: muon needs parameter shapes (a preset, config.json or module), "
                         "not a bare parameter count")
    matrix_params = _matrix_numel(source.full) if source.has_shapes else 0

    best = None
    for stage, named in source.stages.items():
        infos, groups = param_infos(named, optimizer, precision.param, hyperparameters)
        arrival = _arrival(infos, named, arch, grad_arrival)
        plan, ranks = plan_rank_bytes(infos, groups, precision, zero_stage, dp, bucket_numel, arrival, matrix_layout)
        acts = {} if arch is None else act.activation_bytes(
            arch, seq_len=seq_len, micro_batch=micro_batch, tp=tp, pp=pp, stage=stage,
            sequence_parallel=sequence_parallel, recompute=recompute)
        busiest = max(ranks, key=lambda r: (r.total, -r.rank))
        candidate = (busiest.total + sum(acts.values()), stage, busiest, ranks, acts, plan, infos, groups, arrival)
        if best is None or candidate[0] > best[0]:
            best = candidate
    _, stage, busiest, ranks, acts, plan, infos, groups, arrival = best
    notes += _plan_notes(plan, dp)
    if zero_stage >= 2 and plan.world_size > 1:
        first, steady = (window_numel(plan, arrival, first_step=first_step) for first_step in (True, False))
        item = itemsize(precision.reduce)
        # Worth a note only where it could decide whether the job fits.
        if (first - steady) * item > 0.01 * busiest.total:
            notes.append(f"{optimizer} ZeRO-{zero_stage} dp={dp}: the first step launches gradient reductions in "
                         f"the plan's order, before every rank adopts rank 0's: its reduce window is "
                         f"{first * item / 1e9:.2f} GB, not {steady * item / 1e9:.2f} GB")
    settings = {"seq_len": seq_len, "micro_batch": micro_batch, "recompute": recompute,
                "sequence_parallel": sequence_parallel, "bucket_numel": bucket_numel,
                "matrix_layout": matrix_layout,
                "specs": {type(rule).__name__: [s.name for s in rule.state_specs(hp)] for rule, hp in groups}}
    return MemoryReport(
        model=source.name, total_params=source.total_params, matrix_params=matrix_params, optimizer=optimizer,
        precision=precision, zero_stage=zero_stage, dp=dp, tp=tp, pp=pp, pipeline_stage=stage,
        rank=busiest, ranks=tuple(ranks), activations=acts,
        gpu=gpu if isinstance(gpu, str) else f"{gpu} bytes", gpu_bytes=gpu_bytes,
        stage_params=sum(i.numel for i in infos), plan_world_size=plan.world_size,
        num_buckets=len(plan.buckets), notes=tuple(notes), settings=settings,
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


def _plan_notes(plan: ShardPlan, dp: int) -> list[str]:
    balance = plan.matrix_balance()
    if not balance or plan.world_size == 1:
        return []
    note = (f"Muon ({plan.matrix_layout} layout) over {plan.world_size} ranks: state max/mean "
            f"{balance['state_max_over_mean']:.3f}, padding {100 * balance['padding_fraction']:.2f}% of the "
            f"matrices, Newton-Schulz max/mean {balance['ns_max_over_mean']:.3f} (one matrix alone: "
            f"{balance['ns_lower_bound']:.3f})")
    if balance["num_straddlers"]:
        note += (f"; {int(balance['num_straddlers'])} matrices cross rank boundaries, exchanged for "
                 f"Newton-Schulz: <= {int(balance['exchange_max_numel']):,} elements per rank per step")
    return [note]
