"""Plan accounting for the memory planner: a model's parameters -> the runtime's plan -> bytes per rank.

:func:`param_infos` lists parameters the way :class:`~shardopt.ZeroOptimizer`
numbers them and forms the param groups and rules the optimizer would;
:func:`plan_rank_bytes` runs the same :func:`~shardopt.plan_shards` and
multiplies each rank's share of the plan by the bytes of each
:class:`~shardopt.StateSpec` the rule declares, plus the transients the
runtime allocates around them (stage-2 reducer window, ``step()``'s gradient
cast, ``p.grad`` copies, stage-3 gather window, and the workspace a matrix
rule declares, :meth:`~shardopt.rules.base.MatrixRule.workspace_bytes`).
:mod:`shardopt.memory` adds activations and the report; its module docstring
describes the stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from ..muon_optimizer import Muon
from ..optimizer_base import RuleOptimizer
from ..optimizers import SGD, Adagrad, Adam, AdamW, Lion, RMSprop
from ..rules.base import Granularity, MatrixRule, StateShape, StateSpec, UpdateRule
from ..zero.layout import plan_shards
from ..zero.plan import DEFAULT_ALIGN_NUMEL, DEFAULT_BUCKET_NUMEL, ParamInfo, ShardPlan, Storage
from ..zero.policy import MAX_IN_FLIGHT, PrecisionPolicy, shards_gradients
from ..zero.schedule import pool_numel, staging_numel

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
STAGES = (0, 1, 2, 3)
# Process group backends whose collectives' staging buffers the planner knows.
BACKENDS = ("nccl", "gloo")


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


# ------------------------------------------------------------------ parameters -> plan


def _meta(named: Sequence[tuple[str, tuple[int, ...], bool]], dtype: torch.dtype) -> list[tuple[str, nn.Parameter]]:
    return [(n, nn.Parameter(torch.empty(s, dtype=dtype, device="meta"), requires_grad=g)) for n, s, g in named]


def _groups(
    named: list[tuple[str, nn.Parameter]], optimizer: str, hyperparameters: Mapping[str, Any]
) -> list[tuple[list[nn.Parameter], UpdateRule, dict[str, Any]]]:
    """Param groups as the optimizer would form them: (params, rule, hyperparameters).

    The optimizer class says how it splits parameters and which rule each group
    follows (``RuleOptimizer.default_groups``; ``Muon``: ``muon_param_groups``,
    MuonRule and AdamWRule) without building a ``torch.optim.Optimizer``, whose
    first construction imports torch._dynamo (seconds). ``hyperparameters`` (and
    the CLI name's own) set the groups the constructor's keywords set; the others
    keep their rule's defaults. ``tests/test_memory.py`` checks the result against
    the real optimizer inside ``ZeroOptimizer``.
    """
    cls, hp = choose("optimizer", optimizer, OPTIMIZERS)
    out = []
    for params, rule, configured in cls.default_groups(named):
        extra = {**hp, **hyperparameters} if configured else {}
        out.append((params, rule, {**rule.defaults, **extra}))
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
        ParamInfo(index, label[id(p)], tuple(p.shape), dtype, g, rule.granularity,
                  rule.transform_cost(tuple(p.shape), hp) if rule.granularity is Granularity.MATRIX else None)
        for index, (g, p) in enumerate(every)
        for _, rule, hp in [groups[g]]
        if p.requires_grad
    )
    return infos, tuple((rule, hp) for _, rule, hp in groups)


@dataclass(frozen=True)
class _RankShare:
    """One rank's share of a plan, per param group: what the states are allocated over."""

    used_numel: dict[int, int]
    num_storages: dict[int, int]
    # Per group, per matrix storage: the shapes of the matrices it transforms, in
    # MatrixStep's order (those inside its area in area order, then the straddlers it owns).
    matrix_shapes: dict[int, tuple[tuple[tuple[int, ...], ...], ...]]
    straddler_numel: dict[int, int]  # per group: elements of the straddlers it orthogonalizes
    exchange_numel: int = 0  # ShardPlan.exchange_numel(rank), for all ranks in one pass


def used_by_rank(storage: Storage) -> list[int]:
    """``[storage.used_area_numel(r) for r in range(world_size)]`` without a call per rank.

    Slots lie end to end in storage order, so a rank's used elements run from
    its area start to the end of the last slot reaching into it; ranks a slot
    covers whole use their whole area. Tested equal to
    ``Storage.used_area_numel`` on every rank.
    """
    used = [0] * storage.world_size
    size = storage.area_numel
    for slot in storage.slots:
        if slot.numel == 0:
            continue
        end = slot.offset + slot.numel
        first, last = slot.offset // size, (end - 1) // size
        used[first + 1 : last] = [size] * max(0, last - first - 1)
        for rank in {first, last}:
            used[rank] = max(used[rank], min(end, (rank + 1) * size) - rank * size)
    return used


@lru_cache(maxsize=64)
def _plan(infos: tuple[ParamInfo, ...], world_size: int, bucket_numel: int, matrix_layout: str,
          shard_gradients: bool) -> tuple[ShardPlan, tuple[_RankShare, ...]]:
    plan = plan_shards(infos, world_size, bucket_numel=bucket_numel, align_numel=DEFAULT_ALIGN_NUMEL,
                       matrix_layout=matrix_layout, shard_gradients=shard_gradients)
    groups = {s.group for s in plan.storages}
    used = {g: [0] * world_size for g in groups}
    shapes: dict[int, list[list[tuple[tuple[int, ...], ...]]]] = {g: [[] for _ in range(world_size)] for g in groups}
    straddling = {g: [0] * world_size for g in groups}
    num_storages: dict[int, int] = {}
    for storage in plan.storages:
        g = storage.group
        num_storages[g] = num_storages.get(g, 0) + 1
        for rank, numel in enumerate(used_by_rank(storage)):
            used[g][rank] += numel
        whole: dict[int, list[tuple[int, ...]]] = {}
        straddlers: dict[int, list[tuple[int, ...]]] = {}
        for position, (slot, owner) in enumerate(zip(storage.slots, storage.ns_owners)):
            if slot.numel:  # MatrixStep transforms no empty matrix
                ranks = whole if len(storage.members(position)) == 1 else straddlers
                ranks.setdefault(owner, []).append(plan.param(slot.param).shape)
        for rank in whole.keys() | straddlers.keys():
            shapes[g][rank].append(tuple(whole.get(rank, []) + straddlers.get(rank, [])))
    # As ShardPlan.exchange_numel, which walks every straddler per rank (quadratic in ranks):
    # a member sends its part to the owner, the owner sends every other member its part.
    exchange = [0] * world_size
    for straddler in plan.straddlers:
        straddling[plan.storages[straddler.storage].group][straddler.owner] += sum(straddler.parts)
        for member, part in zip(straddler.members, straddler.parts):
            if member != straddler.owner:
                exchange[member] += part
                exchange[straddler.owner] += part
    shares = tuple(
        _RankShare({g: used[g][r] for g in groups}, num_storages, {g: tuple(shapes[g][r]) for g in groups},
                   {g: straddling[g][r] for g in groups}, exchange[r])
        for r in range(world_size)
    )
    return plan, shares


def _state_bytes(specs: Sequence[StateSpec], share: _RankShare, group: int, wide: torch.dtype) -> dict[str, int]:
    # As StorageBuffers.allocate_states: PARAM specs over each storage's used area,
    # SCALAR specs once per storage.
    out: dict[str, int] = {}
    for spec in specs:
        if spec.shape is StateShape.PARAM:
            nbytes = spec.nbytes(share.used_numel.get(group, 0), wide)
        else:
            nbytes = share.num_storages.get(group, 0) * spec.nbytes(1, wide)
        out[spec.name] = out.get(spec.name, 0) + nbytes
    return out


def plan_rank_bytes(
    infos: tuple[ParamInfo, ...],
    groups: Sequence[tuple[UpdateRule, Mapping[str, Any]]],
    precision: Precision,
    zero_stage: int,
    dp: int,
    bucket_numel: int = DEFAULT_BUCKET_NUMEL,
    arrival: Sequence[int] | None = None,
    matrix_layout: str = "balanced",
    backend: str = "nccl",
) -> tuple[ShardPlan, list[RankBytes]]:
    """Bytes every data-parallel rank holds under ``zero_stage`` (see the module docstring).

    ``arrival``: parameter indices in the order gradients complete (default: the
    reverse of their numbering, the order the plan packs buckets in).
    ``matrix_layout``: ``ZeroOptimizer(matrix_layout=...)`` for Muon groups.
    ``backend``: the process group's, for the collectives' staging buffers
    (:func:`~shardopt.zero.schedule.staging_numel`).
    """
    choose("zero_stage", zero_stage, STAGES)
    world = 1 if zero_stage == 0 else dp
    # Kept gradients (stage 1, one rank): the whole flat gradient, as ZeroOptimizer holds it.
    sharded = shards_gradients(zero_stage, world)
    keep_flat = not sharded
    plan, shares = _plan(infos, world, bucket_numel, matrix_layout, sharded)
    p_item, r_item, wide = itemsize(precision.param), itemsize(precision.reduce), precision.wide
    flat = sum(s.flat_numel for s in plan.storages)
    region = sum(s.area_numel for s in plan.storages)
    if arrival is None:
        arrival = sorted((info.index for info in infos), reverse=True)
    # The gradient buffer pool (shardopt.zero.pool) once steps repeat; a matrix's gradient
    # takes a pooled buffer only where it is cast to the reduce dtype.
    window = pool_numel(plan, arrival, pooled_matrices=precision.reduce != precision.param) if sharded else 0
    gather = sum(sorted((b.flat_numel for b in plan.buckets), reverse=True)[: MAX_IN_FLIGHT + 1])
    separate_master = wide != getattr(torch, precision.param)
    # The native all-gather's staging is alike on every rank; gloo's receive buffers are per rank.
    native_staging = (staging_numel(plan, arrival, 0, backend=backend, sharded=sharded)
                      if world > 1 and backend != "gloo" else None)
    out = []
    for rank, share in enumerate(shares):
        states: dict[str, int] = {}
        buffers: dict[str, int] = {}
        for g, (rule, hp) in enumerate(groups):
            for name, nbytes in _state_bytes(rule.state_specs(hp), share, g, wide).items():
                states[name] = states.get(name, 0) + nbytes
            if isinstance(rule, MatrixRule):
                # Storages and groups update one after another: the largest peak.
                workspace = max((rule.workspace_bytes(seq, hp, wide) for seq in share.matrix_shapes.get(g, ())),
                                default=0)
                buffers[f"{rule.name} workspace"] = max(buffers.get(f"{rule.name} workspace", 0), workspace)
                # MatrixStep: the owned straddlers' assembled directions and results
                # (the rule's exchange dtype, held between the two all-to-alls), plus
                # what this rank sends in them.
                wire = rule.exchange_dtype(hp, wide)
                exchange = (2 * share.straddler_numel.get(g, 0) + share.exchange_numel) * itemsize(wire)
                buffers[f"{rule.name} exchange"] = max(buffers.get(f"{rule.name} exchange", 0), exchange)
        if getattr(torch, precision.reduce) != wide:
            # ZeroOptimizer._grad_regions casts every used gradient region to the master dtype.
            buffers["step grad cast"] = sum(share.used_numel.values()) * itemsize(wide)
        if keep_flat and precision.reduce != precision.param:
            # _expose_grads sets p.grad = grad.to(param dtype): a second copy of every gradient.
            buffers["p.grad copies"] = plan.used_numel * p_item
        if sharded:
            buffers["grad buffer pool"] = window * r_item
        if native_staging is not None:
            buffers[f"{backend} staging"] = native_staging * p_item
        elif world > 1:
            buffers["gloo staging"] = staging_numel(plan, arrival, rank, backend=backend, sharded=sharded) * r_item
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

