"""Plan accounting for the memory planner: a model's parameters -> the runtime's plan -> bytes per rank.

:func:`param_infos` lists parameters the way :class:`~shardopt.ZeroOptimizer`
numbers them and forms the param groups and rules the optimizer would;
:func:`plan_rank_bytes` runs the same :func:`~shardopt.plan_shards` and
multiplies each rank's share of the plan by the bytes of each
:class:`~shardopt.StateSpec` the rule declares, plus the transients the
runtime allocates around them (stage-2 reducer window, ``step()``'s gradient
cast, ``p.grad`` copies, stage-3 gather window, Muon's ``update``
temporaries). :mod:`shardopt.memory` adds activations and the report; its
module docstring describes the stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from ..muon_optimizer import Muon, muon_param_groups
from ..optimizer_base import RuleOptimizer
from ..optimizers import SGD, Adagrad, Adam, AdamW, Lion, RMSprop
from ..rules import AdamWRule, MuonRule
from ..rules.base import Granularity, StateShape, StateSpec, UpdateRule
from ..rules.muon import resolve_ns_dtype
from ..rules.newton_schulz import matrix_shape
from ..zero.layout import plan_shards
from ..zero.plan import DEFAULT_ALIGN_NUMEL, DEFAULT_BUCKET_NUMEL, ParamInfo, ShardPlan, Storage
from ..zero.policy import MAX_IN_FLIGHT, PrecisionPolicy

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
    num_storages: dict[int, int]
    matrix_shapes: dict[int, tuple[tuple[int, ...], ...]]  # per group: the matrices it orthogonalizes
    straddler_numel: dict[int, int]  # per group: elements of the straddlers it orthogonalizes


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
    shapes: dict[int, list[list[tuple[int, ...]]]] = {g: [[] for _ in range(world_size)] for g in groups}
    straddling = {g: [0] * world_size for g in groups}
    num_storages: dict[int, int] = {}
    for storage in plan.storages:
        g = storage.group
        num_storages[g] = num_storages.get(g, 0) + 1
        for rank, numel in enumerate(used_by_rank(storage)):
            used[g][rank] += numel
        for slot, owner in zip(storage.slots, storage.ns_owners):
            shapes[g][owner].append(plan.param(slot.param).shape)
    for straddler in plan.straddlers:
        straddling[plan.storages[straddler.storage].group][straddler.owner] += sum(straddler.parts)
    shares = tuple(
        _RankShare({g: used[g][r] for g in groups}, num_storages, {g: tuple(shapes[g][r]) for g in groups},
                   {g: straddling[g][r] for g in groups})
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


def muon_workspace(shapes: Sequence[tuple[int, ...]], hp: Mapping[str, Any], wide: torch.dtype) -> int:
    """Peak transient bytes of Muon's transform over one rank's matrices (read from its code, not measured).

    ``shapes``: the matrices the rank orthogonalizes in one Muon group, in
    storage order (``MatrixStep`` takes the ones inside its area in area
    order, then the straddlers it owns; the straddlers' assembled inputs are
    counted apart, as ``muon exchange``). The rule orthogonalizes them in batches: same-shape groups
    when ``ns_dtype`` is float32, otherwise one matrix at a time. Per batch of
    ``n`` parameters holding ``k`` matrices of ``rows x cols`` (``m = min``):

    * the Nesterov update of the batch's matrices, built for that batch only
      (master dtype; none without ``nesterov``: the momentum buffer is used);
    * ``n > 1``: the ``torch.cat`` stack (master dtype), alive through
      Newton-Schulz; the updates die when the cat returns;
    * Newton-Schulz: at its peak the current and the next X (``rows x cols``
      each) with the Gram matrix and the polynomial (``m x m`` each), in
      ``ns_dtype``, per matrix: ``k (2 rows cols + 2 m^2)``; the input cast and
      the Gram and polynomial of the previous step are alive only at smaller
      moments;
    * what the loop still holds of earlier batches: the previous batch's
      ``outputs``, and the ``stack`` and ``ortho`` of the last multi-matrix
      batch, until their names are bound again.

    The result is the largest such sum over batches.
    """
    if not shapes:
        return 0
    ns_dtype = resolve_ns_dtype(hp.get("ns_dtype") or "bfloat16")
    w, s = itemsize(wide), itemsize(ns_dtype)
    batch = ns_dtype == torch.float32
    batches: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for index, shape in enumerate(shapes):
        batches.setdefault(tuple(shape) if batch else (index, *shape), []).append(shape)
    peak = last_outputs = stale_stack = stale_ortho = 0
    for members in batches.values():
        shape = members[0]
        rows, cols = matrix_shape(shape)
        count = len(members) * (shape[0] if len(shape) == 3 else 1)
        numel = count * rows * cols
        update = numel * w if hp.get("nesterov") else 0
        newton_schulz = count * (2 * rows * cols + 2 * min(rows, cols) ** 2) * s
        if len(members) == 1:
            peak = max(peak, last_outputs + stale_stack + stale_ortho + update + newton_schulz)
            last_outputs = numel * s
        else:
            held, stack = last_outputs + stale_ortho, numel * w
            peak = max(peak, held + stale_stack + update + stack, held + stack + newton_schulz)
            # ``outputs`` are views of ``ortho`` now: count them once, as ``stale_ortho``.
            stale_stack, stale_ortho, last_outputs = stack, numel * s, 0
    return peak

def reduce_window_numel(plan: ShardPlan, arrival: Sequence[int], *, first_step: bool = False) -> int:
    """Peak elements of gradient reduction buffers alive during a stage-2 backward.

    Replays ``hooks.GradientReducer`` on the gradient ``arrival`` order (parameter
    indices): units launch strictly in one order, in the plan's in the first
    step (``first_step``) and from the second on in the order they completed
    in the first; a unit's buffer (a bucket's flat, or a Muon matrix's copy)
    exists from its first gradient until its reduction is waited for, and
    launching one more than ``MAX_IN_FLIGHT`` waits for the oldest.
    """
    units = plan.reduce_units
    unit_of = {param: position for position, unit in enumerate(units) for param in plan.unit_params(unit)}
    pending = [len(plan.unit_params(unit)) for unit in units]
    order = list(range(len(units)))
    if not first_step:
        order = []
        for index in arrival:
            pending[unit_of[index]] -= 1
            if pending[unit_of[index]] == 0:
                order.append(unit_of[index])
        pending = [len(plan.unit_params(unit)) for unit in units]
    alive: dict[int, int] = {}
    in_flight: list[int] = []
    launched = peak = 0
    for index in arrival:
        position = unit_of[index]
        alive[position] = plan.unit_numel(units[position])
        pending[position] -= 1
        while launched < len(order) and pending[order[launched]] == 0:
            in_flight.append(order[launched])
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
    matrix_layout: str = "balanced",
) -> tuple[ShardPlan, list[RankBytes]]:
    """Bytes every data-parallel rank holds under ``zero_stage`` (see the module docstring).

    ``arrival``: parameter indices in the order gradients complete (default: the
    reverse of their numbering, the order the plan packs buckets in).
    ``matrix_layout``: ``ZeroOptimizer(matrix_layout=...)`` for Muon groups.
    """
    choose("zero_stage", zero_stage, STAGES)
    world = 1 if zero_stage == 0 else dp
    # ZeroOptimizer keeps the whole flat gradient at stage 1 and on one rank.
    keep_flat = zero_stage <= 1 or world == 1
    plan, shares = _plan(infos, world, bucket_numel, matrix_layout, not keep_flat)
    p_item, r_item, wide = itemsize(precision.param), itemsize(precision.reduce), precision.wide
    flat = sum(s.flat_numel for s in plan.storages)
    region = sum(s.area_numel for s in plan.storages)
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
                workspace = muon_workspace(share.matrix_shapes.get(g, ()), hp, wide)
                # Groups update one after another: the largest group's peak.
                buffers["muon workspace"] = max(buffers.get("muon workspace", 0), workspace)
                # MatrixStep: the owned straddlers' assembled directions and results
                # (the rule's exchange dtype, held between the two all-to-alls), plus
                # what this rank sends in them.
                wire = rule.exchange_dtype(hp, wide)
                exchange = (2 * share.straddler_numel.get(g, 0) + plan.exchange_numel(rank)) * itemsize(wire)
                buffers["muon exchange"] = max(buffers.get("muon exchange", 0), exchange)
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

