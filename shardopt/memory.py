"""The memory planner: per-GPU bytes of ZeRO training, from the runtime's own plan and declarations.

:func:`estimate` lists the model's parameters with their real shapes (meta
tensors) in the order :class:`~shardopt.ZeroOptimizer` numbers them, forms the
param groups and rules the optimizer would (``muon_param_groups`` for Muon),
runs the same :func:`~shardopt.plan_shards`, and multiplies each rank's share of
the plan by the bytes of each :class:`~shardopt.StateSpec` the rule declares. There
is no table of bytes per parameter: a new rule or state is planned correctly
the day it is declared. For stages 1 and 2 the model-state bytes equal
``ZeroOptimizer.memory_report()`` exactly (``tests/test_memory.py`` checks it).

Stages (Rajbhandari et al. 2020, "ZeRO", sections 3 and 5; K = state bytes):

* 0: no sharding; every rank holds what the plan at world size 1 holds
  (``(2 + 2 + K) psi`` in mixed precision).
* 1: optimizer states and master weights sharded (``P_os``, section 5.1).
* 2: gradients sharded too (``P_os+g``, 5.2); the runtime keeps up to
  ``hooks.MAX_IN_FLIGHT + 1`` full-bucket gradient buffers during backward.
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
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from . import activations as act
from . import presets
from .hooks import MAX_IN_FLIGHT
from .muon_optimizer import Muon, muon_param_groups
from .optimizer_base import RuleOptimizer
from .optimizers import SGD, Adagrad, Adam, AdamW, Lion, RMSprop
from .plan import DEFAULT_ALIGN_NUMEL, DEFAULT_BUCKET_NUMEL, Bucket, ParamInfo, ShardPlan, plan_shards
from .rules import AdamWRule, MuonRule
from .rules.base import Granularity, StateShape, StateSpec, UpdateRule
from .rules.newton_schulz import matrix_shape
from .zero_optimizer import PrecisionPolicy

# CLI optimizer names -> (runtime optimizer class, hyperparameters beyond its defaults).
OPTIMIZERS: dict[str, tuple[type[RuleOptimizer], dict[str, Any]]] = {
    "sgd": (SGD, {}),
    "momentum": (SGD, {"momentum": 0.9}),
    "nesterov": (SGD, {"momentum": 0.9, "nesterov": True}),
    "adagrad": (Adagrad, {}),
    "rmsprop": (RMSprop, {}),
    "adam": (Adam, {}),
    "adamw": (AdamW, {}),
    "muon": (Muon, {}),
    "lion": (Lion, {}),
}
GPUS = presets.GPUS
STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Precision:
    """Dtypes of parameters, gradient reduction and master weights (fp32 master => fp32 states)."""

    name: str
    param: str
    reduce: str
    master: str

    def policy(self) -> PrecisionPolicy:
        """The runtime's equivalent :class:`~shardopt.PrecisionPolicy`."""
        return PrecisionPolicy(reduce_dtype=getattr(torch, self.reduce), master_dtype=getattr(torch, self.master))

    @property
    def wide(self) -> torch.dtype:
        """Dtype of the master copy and states: as ``ZeroOptimizer`` promotes them."""
        return torch.promote_types(getattr(torch, self.param), getattr(torch, self.master))


PRECISIONS = {
    "fp32": Precision("fp32", "float32", "float32", "float32"),
    "bf16": Precision("bf16", "bfloat16", "bfloat16", "bfloat16"),
    "mixed": Precision("mixed", "bfloat16", "bfloat16", "float32"),
}


def itemsize(dtype: str | torch.dtype) -> int:
    return torch.empty((), dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype).element_size()


def choose(kind: str, value: Any, choices: Mapping[str, Any] | Sequence[Any]) -> Any:
    if value not in choices:
        names = ", ".join(str(c) for c in choices)
        raise ValueError(f"Invalid {kind}: {value!r} (expected one of {names})")
    return choices[value] if isinstance(choices, Mapping) else value


@dataclass(frozen=True)
class RankBytes:
    """What one data-parallel rank holds, in bytes (``optimizer_states`` excludes the master copy)."""

    rank: int
    params: int
    grads: int
    master_params: int
    optimizer_states: Mapping[str, int]
    buffers: Mapping[str, int]

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.master_params + sum(self.optimizer_states.values())

    @property
    def total(self) -> int:
        return self.model_states + sum(self.buffers.values())


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


# ------------------------------------------------------------------ parameters -> plan


def _meta(named: Sequence[tuple[str, tuple[int, ...], bool]], dtype: torch.dtype) -> list[tuple[str, nn.Parameter]]:
    return [(n, nn.Parameter(torch.empty(s, dtype=dtype, device="meta"), requires_grad=g)) for n, s, g in named]


def _groups(
    named: list[tuple[str, nn.Parameter]], optimizer: str, hyperparameters: Mapping[str, Any]
) -> list[tuple[list[nn.Parameter], UpdateRule, dict[str, Any]]]:
    """Param groups as the optimizer would form them: (params, rule, hyperparameters).

    Mirrors ``RuleOptimizer.rule_for_group`` (``Muon``: ``use_muon`` groups follow
    MuonRule, the rest AdamWRule, split by ``muon_param_groups``) without building
    a ``torch.optim.Optimizer``, whose first construction imports torch._dynamo
    (seconds). ``tests/test_memory.py`` checks the result against the real
    optimizer inside ``ZeroOptimizer``.
    """
    cls, hp = choose("optimizer", optimizer, OPTIMIZERS)
    if cls is Muon:
        out = []
        for group in muon_param_groups(named):
            rule: UpdateRule = MuonRule() if group["use_muon"] else AdamWRule()
            extra = {**hp, **hyperparameters} if group["use_muon"] else {}
            out.append((group["params"], rule, {**rule.defaults, **extra}))
    else:
        rule = cls.rule
        out = [([p for _, p in named], rule, {**rule.defaults, **hp, **hyperparameters})]
    for _, rule, group_hp in out:
        unknown = sorted(set(group_hp) - set(rule.defaults))
        if unknown:
            raise ValueError(f"Invalid hyperparameters for {optimizer}: {unknown} (expected some of "
                             f"{sorted(rule.defaults)})")
        rule.validate(group_hp)
    return out


def param_infos(
    named: Sequence[tuple[str, tuple[int, ...], bool]],
    optimizer: str,
    dtype: str,
    hyperparameters: Mapping[str, Any] | None = None,
) -> tuple[tuple[ParamInfo, ...], tuple[tuple[UpdateRule, dict[str, Any]], ...]]:
    """The ``ParamInfo`` list ``ZeroOptimizer`` builds, and each group's (rule, hyperparameters).

    ``named``: ``(name, shape, requires_grad)`` in registration order. Parameters
    are numbered in param-group order, frozen ones included in the numbering and
    left out of the list, as ``ZeroOptimizer.__init__`` does.
    """
    metas = _meta(named, getattr(torch, dtype))
    groups = _groups(metas, optimizer, hyperparameters or {})
    label = {id(p): n for n, p in metas}
    every = [(g, p) for g, (params, _, _) in enumerate(groups) for p in params]
    infos = tuple(
        ParamInfo(index, label[id(p)], tuple(p.shape), dtype, g, groups[g][1].granularity)
        for index, (g, p) in enumerate(every)
        if p.requires_grad
    )
    return infos, tuple((rule, hp) for _, rule, hp in groups)


@dataclass(frozen=True)
class _RankShare:
    """One rank's share of a plan, per param group: what the states are allocated over."""

    used_numel: dict[int, int]
    num_buckets: dict[int, int]
    num_matrices: dict[int, int]
    matrix_shapes: tuple[tuple[int, ...], ...]


def used_by_rank(bucket: Bucket) -> list[int]:
    """``[bucket.used_region_numel(r) for r in range(world_size)]`` without a call per rank.

    Elementwise buckets lay their slots end to end, so a rank's used elements run
    from its region start to the end of the last slot reaching into it; ranks a
    slot covers whole use their whole region. Matrix buckets ask the plan for
    their owners only (a rank owning no matrix uses nothing). Tested equal to
    ``Bucket.used_region_numel`` on every rank.
    """
    used = [0] * bucket.world_size
    if bucket.granularity is Granularity.MATRIX:
        for rank in set(bucket.owners):
            used[rank] = bucket.used_region_numel(rank)
        return used
    size = bucket.region_numel
    for slot in bucket.slots:
        if slot.numel == 0:
            continue
        end = slot.offset + slot.numel
        first, last = slot.offset // size, (end - 1) // size
        used[first + 1 : last] = [size] * max(0, last - first - 1)
        for rank in {first, last}:
            used[rank] = max(used[rank], min(end, (rank + 1) * size) - rank * size)
    return used


@lru_cache(maxsize=64)
def _plan(infos: tuple[ParamInfo, ...], world_size: int, bucket_numel: int) -> tuple[ShardPlan, tuple[_RankShare, ...]]:
    plan = plan_shards(infos, world_size, bucket_numel=bucket_numel, align_numel=DEFAULT_ALIGN_NUMEL)
    groups = {b.group for b in plan.buckets}
    used = {g: [0] * world_size for g in groups}
    matrices = {g: [0] * world_size for g in groups}
    shapes: list[list[tuple[int, ...]]] = [[] for _ in range(world_size)]
    num_buckets: dict[int, int] = {}
    by_index = {info.index: info for info in infos}
    for bucket in plan.buckets:
        g = bucket.group
        num_buckets[g] = num_buckets.get(g, 0) + 1
        for rank, numel in enumerate(used_by_rank(bucket)):
            used[g][rank] += numel
        for slot, owner in zip(bucket.slots, bucket.owners):
            matrices[g][owner] += 1
            shapes[owner].append(by_index[slot.param].shape)
    shares = tuple(
        _RankShare({g: used[g][r] for g in groups}, num_buckets, {g: matrices[g][r] for g in groups},
                   tuple(shapes[r]))
        for r in range(world_size)
    )
    return plan, shares


def _state_bytes(specs: Sequence[StateSpec], share: _RankShare, group: int, wide: torch.dtype) -> dict[str, int]:
    # As BucketBuffers.allocate_states: PARAM specs over each bucket's used region, SCALAR
    # specs once per bucket and once more per owned matrix of a matrix bucket.
    out: dict[str, int] = {}
    for spec in specs:
        if spec.shape is StateShape.PARAM:
            nbytes = spec.nbytes(share.used_numel.get(group, 0), wide)
        else:
            count = share.num_buckets.get(group, 0) + share.num_matrices.get(group, 0)
            nbytes = count * spec.nbytes(1, wide)
        out[spec.name] = out.get(spec.name, 0) + nbytes
    return out


def _muon_workspace(share: _RankShare, hp: Mapping[str, Any], wide: torch.dtype) -> int:
    """Transient bytes of MuonRule.update on this rank's matrices (read from its code, not measured).

    Nesterov makes an update tensor per owned matrix at once (master dtype);
    Newton-Schulz then holds, for one matrix at a time, the input cast, the
    normalised X, the next X (rows x cols each) and the Gram and polynomial
    (min^2 each), in ``ns_dtype``.
    """
    if not share.matrix_shapes:
        return 0
    owned = sum(math.prod(shape) for shape in share.matrix_shapes)
    ns_item = itemsize(hp.get("ns_dtype") or "bfloat16")
    largest = 0
    for shape in share.matrix_shapes:
        rows, cols = matrix_shape(shape)
        count = shape[0] if len(shape) == 3 else 1
        largest = max(largest, count * (3 * rows * cols + 2 * min(rows, cols) ** 2))
    return (owned * itemsize(wide) if hp.get("nesterov") else 0) + largest * ns_item


def reduce_window_numel(plan: ShardPlan, arrival: Sequence[int]) -> int:
    """Peak elements of full-bucket gradient buffers alive during a stage-2 backward.

    Replays ``hooks.GradientReducer`` on the gradient ``arrival`` order (parameter
    indices): a bucket's buffer exists from its first gradient until its
    reduce-scatter is waited for; buckets launch strictly in plan order once
    complete, and launching one more than ``MAX_IN_FLIGHT`` waits for the oldest.
    A bucket complete before the ones ahead of it waits with its buffer alive.
    """
    bucket_of = {slot.param: bucket.index for bucket in plan.buckets for slot in bucket.slots}
    pending = [len(bucket.slots) for bucket in plan.buckets]
    alive: dict[int, int] = {}
    in_flight: list[int] = []
    launched = peak = 0
    for index in arrival:
        bucket = bucket_of[index]
        alive[bucket] = plan.buckets[bucket].flat_numel
        pending[bucket] -= 1
        while launched < len(pending) and pending[launched] == 0:
            in_flight.append(launched)
            launched += 1
            while len(in_flight) > MAX_IN_FLIGHT:
                alive.pop(in_flight.pop(0))
        peak = max(peak, sum(alive.values()))
    return peak


def plan_rank_bytes(
    infos: tuple[ParamInfo, ...],
    groups: Sequence[tuple[UpdateRule, Mapping[str, Any]]],
    precision: Precision,
    zero_stage: int,
    dp: int,
    bucket_numel: int = DEFAULT_BUCKET_NUMEL,
    arrival: Sequence[int] | None = None,
) -> tuple[ShardPlan, list[RankBytes]]:
    """Bytes every data-parallel rank holds under ``zero_stage`` (see the module docstring).

    ``arrival``: parameter indices in the order gradients complete (default: the
    reverse of their numbering, the order the plan packs buckets in).
    """
    choose("zero_stage", zero_stage, STAGES)
    world = 1 if zero_stage == 0 else dp
    plan, shares = _plan(infos, world, bucket_numel)
    p_item, r_item, wide = itemsize(precision.param), itemsize(precision.reduce), precision.wide
    flat = sum(b.flat_numel for b in plan.buckets)
    region = sum(b.region_numel for b in plan.buckets)
    # ZeroOptimizer keeps the whole flat gradient at stage 1 and on one rank.
    keep_flat = zero_stage <= 1 or world == 1
    if arrival is None:
        arrival = sorted((info.index for info in infos), reverse=True)
    window = 0 if keep_flat else reduce_window_numel(plan, arrival)
    gather = sum(sorted((b.flat_numel for b in plan.buckets), reverse=True)[: MAX_IN_FLIGHT + 1])
    separate_master = wide != getattr(torch, precision.param)
    out = []
    for rank, share in enumerate(shares):
        states: dict[str, int] = {}
        buffers: dict[str, int] = {}
        for g, (rule, hp) in enumerate(groups):
            for name, nbytes in _state_bytes(rule.state_specs(hp), share, g, wide).items():
                states[name] = states.get(name, 0) + nbytes
            if rule.granularity is Granularity.MATRIX:
                buffers["muon workspace"] = buffers.get("muon workspace", 0) + _muon_workspace(share, hp, wide)
        if getattr(torch, precision.reduce) != wide:
            # ZeroOptimizer._grad_regions casts every used gradient region to the master dtype.
            buffers["step grad cast"] = sum(share.used_numel.values()) * itemsize(wide)
        if keep_flat and precision.reduce != precision.param:
            # _expose_grads sets p.grad = grad.to(param dtype): a second copy of every gradient.
            buffers["p.grad copies"] = plan.used_numel * p_item
        if not keep_flat:
            buffers["grad reduce window"] = window * r_item
        if zero_stage == 3 and world > 1:
            buffers["param gather window"] = gather * p_item
        out.append(RankBytes(
            rank=rank,
            params=(region if zero_stage == 3 else flat) * p_item,
            grads=(flat if keep_flat else region) * r_item,
            master_params=region * itemsize(wide) if separate_master else 0,
            optimizer_states=states,
            buffers={k: v for k, v in buffers.items() if v},
        ))
    return plan, out


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
) -> MemoryReport:
    """Per-GPU memory of training ``model`` with ZeRO ``zero_stage`` over ``dp`` ranks.

    ``model``: a preset name (``shardopt.presets.PRESETS``), a Hugging Face
    ``config.json`` path or dict, a bare parameter count (an int; planned as
    bucket-sized 1-D tensors, no activations), or an ``nn.Module`` (meta device
    is fine: only names, shapes and ``requires_grad`` are read; its ``config``
    attribute, if any, gives activations). ``precision``: ``fp32``, ``bf16``,
    ``mixed`` (bf16 params and grads, fp32 master and states) or a
    :class:`Precision`. ``tp``/``pp``: Megatron-style splits
    (:mod:`shardopt.presets`); ``dp`` ranks shard each tp/pp rank's parameters.
    ``hyperparameters``: overrides for the rule (``{"amsgrad": True}``; Muon's
    apply to its matrix group). ``grad_arrival``: parameter names in the order
    their gradients complete, for the stage-2 window (default: assumed, see
    :func:`shardopt.presets.backward_order`).

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
        plan, ranks = plan_rank_bytes(infos, groups, precision, zero_stage, dp, bucket_numel,
                                      _arrival(infos, named, arch, grad_arrival))
        acts = {} if arch is None else act.activation_bytes(
            arch, seq_len=seq_len, micro_batch=micro_batch, tp=tp, pp=pp, stage=stage,
            sequence_parallel=sequence_parallel, recompute=recompute)
        busiest = max(ranks, key=lambda r: (r.total, -r.rank))
        candidate = (busiest.total + sum(acts.values()), stage, busiest, ranks, acts, plan, infos, groups)
        if best is None or candidate[0] > best[0]:
            best = candidate
    _, stage, busiest, ranks, acts, plan, infos, groups = best
    notes += _plan_notes(plan, dp)
    settings = {"seq_len": seq_len, "micro_batch": micro_batch, "recompute": recompute,
                "sequence_parallel": sequence_parallel, "bucket_numel": bucket_numel,
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
    matrix = [b for b in plan.buckets if b.granularity is Granularity.MATRIX]
    used, flat = sum(b.used_numel for b in matrix), sum(b.flat_numel for b in matrix)
    if flat <= 1.5 * used:
        return []
    single, owners = sum(len(b.slots) == 1 for b in matrix), {o for b in matrix for o in b.owners}
    return [f"matrix buckets are {flat / used:.1f}x their matrices ({single} of {len(matrix)} hold one; "
            f"{len(owners)} of {dp} ranks own any): plan_shards caps them at bucket_numel and balances each alone"]
