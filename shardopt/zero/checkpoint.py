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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..rules.base import StateShape, StateSpec
from .buffers import StorageBuffers
from .comm import Communicator
from .plan import ShardPlan

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
    """Load a sharded or full state dict; returns a sharded one's metadata (``None`` for full)."""
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
    for saved, group in zip(saved_groups, opt.param_groups):
        for key, value in saved.items():
            if key != "params":
                group[key] = value
    if shard is not None:
        _load_sharded(opt, state_dict["state"])
    else:
        _load_full(opt, {int(k): v for k, v in state_dict["state"].items()})
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


def _load_full(opt: ShardedState, state: dict[int, dict[str, Any]]) -> None:
    if not any(info.index in state for info in opt.plan.params):
        return
    for buffers in opt.storages:
        storage = buffers.storage
        specs = opt.specs(storage.group)
        opt.ensure_states(buffers)
        pieces = storage.pieces(opt.comm.rank)
        for spec in specs:
            if spec.shape is StateShape.SCALAR:
                entry = next((state[s.param] for s in storage.slots if s.param in state), {})
                buffers.states[spec.name].fill_(_scalar(entry, spec))
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
    if spec.name in entry:
        return float(entry[spec.name])
    # torch.optim.SGD keeps no "step"; filled buffers mean the next step is not the first.
    return 1.0 if entry else spec.init
