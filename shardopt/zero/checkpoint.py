"""Optimizer state of a :class:`~shardopt.ZeroOptimizer`, sharded or full.

* Sharded (``opt.state_dict()``): this rank's regions as they are, plus the
  plan's fingerprint, world size and rank, checked on load. Cheapest; reload at
  the same world size with the same parameters.
* Full (``opt.full_state_dict()``): torch.optim's format, keyed by parameter
  index over the param groups exactly as the unsharded optimizer keys it, with
  torch's state names. It loads into ``torch.optim.X``/``shardopt.X`` and into a
  ZeroOptimizer at any world size: that is how checkpoints reshard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..rules.base import StateShape, StateSpec
from .buffers import StorageBuffers
from .comm import Communicator
from .plan import ShardPlan, Storage

SHARDED_FORMAT = "shardopt-sharded-v3"  # v2: states per storage area; v3: plan fingerprints of 0.2


@dataclass(frozen=True)
class ShardedState:
    """What a checkpoint reads and writes of a sharded optimizer, and nothing more.

    ``plan`` says where every parameter lives, ``storages`` are this rank's
    buffers (states per storage area), ``param_groups`` the hyperparameters
    (updated in place on load), ``specs(group)`` the rule's state declarations
    for a param group, and ``comm`` gathers what rank 0 assembles.
    """

    plan: ShardPlan
    storages: list[StorageBuffers]
    param_groups: list[dict[str, Any]]
    specs: Callable[[int], tuple[StateSpec, ...]]
    comm: Communicator
    #: The trained parameters by index over the param groups (what ``plan.params`` describes):
    #: the public checkpoint API (:mod:`shardopt.checkpoint`) names them by identity in the model.
    params: Mapping[int, torch.Tensor] = field(default_factory=dict)
    #: The update rule's name (``UpdateRule.name``) of a param group, recorded in checkpoints.
    rule_name: Callable[[int], str] = lambda group: "unknown"

    def ensure_states(self, buffers: StorageBuffers) -> None:
        buffers.allocate_states(self.specs(buffers.storage.group))


def _param_groups(opt: ShardedState) -> list[dict[str, Any]]:
    groups, start = [], 0
    for group in opt.param_groups:
        saved = {key: value for key, value in group.items() if key != "params"}
        saved["params"] = list(range(start, start + len(group["params"])))
        start += len(group["params"])
        groups.append(saved)
    return groups


def sharded_state_dict(opt: ShardedState, extra: dict[str, Any]) -> dict[str, Any]:
    """This rank's states as they are; ``extra`` (the optimizer's own counters) joins the metadata."""
    state = {buffers.storage.index: {"area": dict(buffers.states)} for buffers in opt.storages if buffers.states}
    return {
        "state": state,
        "param_groups": _param_groups(opt),
        "shard": {
            "format": SHARDED_FORMAT,
            "world_size": opt.comm.world_size,
            "rank": opt.comm.rank,
            "plan": opt.plan.fingerprint(),
            **extra,
        },
    }


def full_state_dict(opt: ShardedState, *, all_ranks: bool = False) -> dict[str, Any] | None:
    keep = all_ranks or opt.comm.rank == 0
    state: dict[int, dict[str, torch.Tensor]] = {}
    for buffers in opt.storages:
        if not buffers.states:
            continue
        storage = buffers.storage
        for name, tensor in buffers.states.items():
            if tensor.dim() == 0:
                continue
            local = torch.zeros(storage.area_numel, dtype=tensor.dtype, device=tensor.device)
            local[: tensor.numel()].copy_(tensor)
            flat = torch.empty(storage.flat_numel, dtype=tensor.dtype, device=tensor.device)
            opt.comm.all_gather_into(flat, local)
            if keep:
                for slot in storage.slots:
                    shape = opt.plan.param(slot.param).shape
                    piece = flat[slot.offset : slot.offset + slot.numel].view(shape).clone()
                    state.setdefault(slot.param, {})[name] = piece
        scalars = _local_scalars(opt, buffers)
        for per_rank in opt.comm.all_gather_objects(scalars):
            for index, values in per_rank.items():
                if keep:
                    for name, value in values.items():
                        state.setdefault(index, {})[name] = torch.tensor(value, dtype=torch.float32)
    if not keep:
        return None
    ordered = {index: _ordered(opt, index, state[index]) for index in sorted(state)}
    return {"state": ordered, "param_groups": _param_groups(opt)}


def _local_scalars(opt: ShardedState, buffers: StorageBuffers) -> dict[int, dict[str, float]]:
    """Scalar states (``step``): one per storage, identical on every rank; rank 0 reports them."""
    if opt.comm.rank != 0:
        return {}
    scalars = {n: float(t) for n, t in buffers.states.items() if t.dim() == 0}
    return {slot.param: dict(scalars) for slot in buffers.storage.slots} if scalars else {}


def _ordered(opt: ShardedState, index: int, entry: dict[str, torch.Tensor]) -> dict[str, Any]:
    order = [spec.name for spec in opt.specs(opt.plan.param(index).group)]
    return {name: entry[name] for name in order if name in entry}


def load_state_dict(opt: ShardedState, state_dict: dict[str, Any]) -> dict[str, Any] | None:
    """Load a sharded or full state dict; returns a sharded one's metadata (``None`` for full).

    Everything is checked before anything changes: the param groups, then (with
    the saved hyperparameters, which decide the rule's state names) every state
    tensor's name and size and every storage's scalar states. On an error the
    optimizer is as it was.
    """
    if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
        raise ValueError("Invalid state_dict: expected a dict with 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups) or any(
        len(saved["params"]) != len(group["params"])
        for saved, group in zip(saved_groups, opt.param_groups)
    ):
        raise ValueError(
            "Invalid state_dict: its param groups have sizes "
            f"{[len(g['params']) for g in saved_groups]}, this optimizer's have "
            f"{[len(g['params']) for g in opt.param_groups]}"
        )
    shard = state_dict.get("shard")
    if shard is not None:
        _check_shard(opt, shard)
    before = [dict(group) for group in opt.param_groups]
    for saved, group in zip(saved_groups, opt.param_groups):
        group.update({key: value for key, value in saved.items() if key != "params"})
    try:
        if shard is None:
            state = {int(k): v for k, v in state_dict["state"].items()}
            scalars = check_full_state(opt, state)
    except Exception:
        # The rule's state names depend on the saved hyperparameters, so they were
        # applied to be checked; restore them in the same dicts (schedulers hold them).
        for group, old in zip(opt.param_groups, before):
            group.clear()
            group.update(old)
        raise
    if shard is not None:
        _load_sharded(opt, state_dict["state"])
    else:
        _load_full(opt, state, scalars)
    return shard


def _check_shard(opt: ShardedState, shard: dict[str, Any]) -> None:
    expected = {"format": SHARDED_FORMAT, "world_size": opt.comm.world_size,
                "rank": opt.comm.rank, "plan": opt.plan.fingerprint()}
    for key, value in expected.items():
        if shard.get(key) != value:
            raise ValueError(
                f"Invalid state_dict: sharded checkpoint has {key}={shard.get(key)!r}, this "
                f"optimizer has {key}={value!r}; reshard through full_state_dict() instead"
            )


def _load_sharded(opt: ShardedState, state: dict[Any, Any]) -> None:
    for buffers in opt.storages:
        saved = state.get(buffers.storage.index)
        if saved is None:
            continue
        opt.ensure_states(buffers)
        for name, tensor in saved["area"].items():
            buffers.states[name].copy_(tensor)


def check_entry(label: str, shape: tuple[int, ...], entry: dict[str, Any], specs: tuple[StateSpec, ...],
                size_of: Callable[[Any], tuple[int, ...]] | None = None) -> None:
    """Raise ``ValueError`` naming parameter ``label`` unless ``entry`` (its saved state, name ->
    tensor) holds exactly the rule's states: every per-parameter state with the parameter's
    ``shape`` (or its number of elements, flattened), scalars optional (torch.optim.SGD keeps
    no ``step``), and nothing else. ``size_of`` reads a saved tensor's logical shape."""
    size_of = size_of or (lambda value: tuple(torch.as_tensor(value).shape))
    names = {spec.name for spec in specs}
    unknown = sorted(name for name, value in entry.items() if name not in names and value is not None)
    if unknown:
        raise ValueError(
            f"Invalid state_dict: parameter {label} has state {unknown}, which this optimizer's rule "
            f"does not keep (expected {sorted(names)}); was it saved by another optimizer or with "
            "other hyperparameters?"
        )
    numel = math.prod(shape)
    for spec in specs:
        value = entry.get(spec.name)
        if spec.shape is StateShape.SCALAR:
            if value is not None and math.prod(size_of(value)) != 1:
                raise ValueError(f"Invalid state_dict: parameter {label}: state {spec.name!r} has shape "
                                 f"{size_of(value)}, expected a scalar")
            continue
        if value is None:
            raise ValueError(f"Invalid state_dict: parameter {label} has no state {spec.name!r} "
                             f"(it has {sorted(entry)})")
        saved = size_of(value)
        if saved != shape and saved != (numel,):
            raise ValueError(f"Invalid state_dict: parameter {label}: state {spec.name!r} has shape "
                             f"{saved}, expected the parameter's shape {shape}")


def storage_scalars(opt: ShardedState, storage: Storage, entries: dict[int, dict[str, Any]],
                    label: Callable[[int], str]) -> dict[str, float]:
    """The value of each scalar state (``step``) of ``storage`` from its parameters' saved entries.

    The rules keep one scalar per storage (every parameter of a storage takes the
    same steps), so the saved per-parameter values must agree: a torch.optim
    checkpoint where some parameters missed steps (no gradient) cannot be
    represented and is refused, naming the two parameters, instead of giving
    every parameter the first one's count. Parameters without saved state are
    ignored (their states start from the rule's initial values).
    """
    out: dict[str, float] = {}
    for spec in opt.specs(storage.group):
        if spec.shape is not StateShape.SCALAR:
            continue
        first: tuple[int, float] | None = None
        for slot in storage.slots:
            entry = entries.get(slot.param)
            if entry is None:
                continue
            value = _scalar(entry, spec)
            if first is None:
                first = (slot.param, value)
            elif value != first[1]:
                raise ValueError(
                    f"Invalid state_dict: parameters {label(first[0])} and {label(slot.param)} have "
                    f"{spec.name} {first[1]:g} and {value:g}, but share one {spec.name} in this optimizer "
                    f"(storage {storage.index}: parameters that step together); per-parameter step "
                    "counts that differ (torch.optim skips parameters without a gradient) cannot be loaded"
                )
        out[spec.name] = spec.init if first is None else first[1]
    return out


def check_full_state(opt: ShardedState, state: dict[int, dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Check a full (torch.optim-format) state against the rule and the parameters' shapes;
    return each storage's scalar states. Raises before anything is loaded."""
    def label(index: int) -> str:
        return f"#{index} ({opt.plan.param(index).name})"

    total = sum(len(group["params"]) for group in opt.param_groups)
    for index in state:
        # State of a frozen parameter (requires_grad=False here) is ignored, as before.
        if not 0 <= index < total:
            raise ValueError(f"Invalid state_dict: state for parameter #{index}, but this optimizer's "
                             f"param groups hold {total} parameters")
    for info in opt.plan.params:
        if info.index in state:
            check_entry(label(info.index), info.shape, state[info.index], opt.specs(info.group))
    return {storage.index: storage_scalars(opt, storage, state, label) for storage in opt.plan.storages}


def _load_full(opt: ShardedState, state: dict[int, dict[str, Any]], scalars: dict[int, dict[str, float]]) -> None:
    if not any(info.index in state for info in opt.plan.params):
        return
    for buffers in opt.storages:
        storage = buffers.storage
        opt.ensure_states(buffers)
        for name, value in scalars[storage.index].items():
            buffers.states[name].fill_(value)
        pieces = storage.pieces(opt.comm.rank)
        for spec in opt.specs(storage.group):
            if spec.shape is StateShape.SCALAR:
                continue
            area = buffers.states[spec.name]
            for piece in pieces:
                source = state.get(piece.param, {}).get(spec.name)
                target = area[piece.offset : piece.offset + piece.numel]
                if source is None:
                    target.fill_(spec.init)
                else:
                    flat = torch.as_tensor(source).reshape(-1)
                    target.copy_(flat[piece.param_offset : piece.param_offset + piece.numel])


def _scalar(entry: dict[str, Any], spec: StateSpec) -> float:
    if entry.get(spec.name) is not None:
        return float(entry[spec.name])
    # torch.optim.SGD keeps no "step"; filled buffers mean the next step is not the first.
    return 1.0 if entry else spec.init
