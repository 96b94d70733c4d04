"""``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` for :class:`~shardopt.ZeroOptimizer`.

The layout is the one ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``
gives for FSDP2 + torch.optim (https://pytorch.org/docs/stable/distributed.checkpoint.html),
keyed by fully qualified parameter names, plus one ``"shardopt"`` entry::

    {"state": {fqn: {"step": tensor(),                  # per parameter, plain 0-dim float32
                     "exp_avg": <param shape>, ...}},   # the rule's states, torch's names
     "param_groups": [{"lr": ..., ..., "params": [fqn, ...]}, ...],
     "shardopt": {"meta": "<json>",                     # format, rules, names, shapes: checked on load
                  "num_skipped_steps": int,
                  "master_weights": {fqn: <param shape, fp32>}}}  # only when separate from the params

Each rank's tensors are its pieces of the logical parameter shapes: a DTensor
over the boxes of its area (:mod:`shardopt.checkpoint.boxes`), views of the
optimizer's own buffers. ``dcp.save`` writes them without a copy and ``dcp.load``
into a fresh ``get_optimizer_state_dict`` reads straight into this rank's areas
(no full-size gather, and no ``step()``, unlike torch's function, which steps
an optimizer whose state is empty).

fp32 master weights live under ``"shardopt"`` rather than in ``"state"`` so that
``"state"`` holds exactly what torch.optim keeps; for fp32 parameters the master
weights are the parameters (the model's state dict) and are not repeated.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..optimizer_base import RuleOptimizer
from ..rules.base import StateShape
from ..zero.checkpoint import ShardedState, check_entry, storage_scalars
from ..zero.optimizer import ZeroOptimizer
from .boxes import copies_into, sharded_view
from .meta import FORMAT, check_described, describe, param_names, read_meta

__all__ = ["FORMAT", "OptimizerState", "check_meta", "get_optimizer_state_dict", "param_names", "read_meta",
           "set_optimizer_state_dict"]
_MESHES: dict[tuple[int, str], Any] = {}


def _mesh(state: ShardedState, device: torch.device) -> Any | None:
    """The device mesh of the optimizer's process group (``None`` on one rank)."""
    if state.comm.world_size == 1:
        return None
    from torch.distributed.device_mesh import DeviceMesh

    key = (id(state.comm.group), device.type)
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh.from_group(state.comm.group, device.type)
    return _MESHES[key]


def _check_optimizer(optimizer: Any) -> ZeroOptimizer:
    if not isinstance(optimizer, ZeroOptimizer):
        raise TypeError(f"Invalid optimizer: {type(optimizer).__name__} (expected a shardopt.ZeroOptimizer or "
                        "a shardopt optimizer such as shardopt.AdamW; other optimizers: "
                        "torch.distributed.checkpoint.state_dict)")
    if optimizer.closed:
        raise ValueError("Invalid optimizer: it was closed (its state is gone)")
    return optimizer


def _meta(state: ShardedState, names: list[str], masters: bool) -> dict[str, Any]:
    return describe(state.param_groups, state.rule_name, names, masters, state.comm.world_size)


def get_optimizer_state_dict(model: nn.Module, optimizer: ZeroOptimizer | RuleOptimizer) -> dict[str, Any]:
    """This rank's optimizer state as a DCP-ready dict (format: module docstring).

    A single-process shardopt optimizer (``shardopt.AdamW``, ``shardopt.Muon``, ...,
    e.g. on FSDP2 / TP DTensor parameters) gives torch's layout for it plus the
    same integrity record (:mod:`.rule_state`).

    Its tensors are views of the optimizer's buffers: pass it to ``dcp.save`` as
    it is, or to ``dcp.load`` and then :func:`set_optimizer_state_dict`. Not a
    collective (each rank describes its own areas); states that the first
    ``step()`` would allocate are allocated here with their initial values.
    """
    if isinstance(optimizer, RuleOptimizer):
        from .rule_state import get_rule_state_dict

        return get_rule_state_dict(model, optimizer)
    opt = _check_optimizer(optimizer)
    state = opt.sharded_state()
    names = param_names(model, opt)
    mesh = _mesh(state, opt.device)
    out: dict[str, dict[str, Any]] = {}
    masters: dict[str, Tensor] = {}
    separate = any(b.master_separate() for b in state.storages)
    for buffers in state.storages:
        storage = buffers.storage
        state.ensure_states(buffers)
        specs = state.specs(storage.group)
        rank_pieces = {piece.param: piece for piece in storage.pieces(state.comm.rank)}
        for slot in storage.slots:
            shape = state.plan.param(slot.param).shape
            if not shape:
                raise NotImplementedError(f"Invalid params: {names[slot.param]} has no dimensions; 0-dim "
                                          "parameters are not supported by the DCP checkpoint yet")
            piece = rank_pieces.get(slot.param)
            start, numel, offset = (piece.param_offset, piece.numel, piece.offset) if piece else (0, 0, 0)
            entry: dict[str, Tensor] = {}
            for spec in specs:
                tensor = buffers.states[spec.name]
                if spec.shape is StateShape.SCALAR:
                    # One scalar per storage in the engine; one per parameter in the format.
                    entry[spec.name] = tensor.detach().clone()
                else:
                    entry[spec.name] = sharded_view(tensor[offset : offset + numel], shape, start, mesh)
            if entry:
                out[names[slot.param]] = entry
            if separate:
                masters[names[slot.param]] = sharded_view(buffers.master[offset : offset + numel], shape, start, mesh)
    groups = []
    position = 0
    for group in state.param_groups:
        saved = {key: value for key, value in group.items() if key != "params"}
        saved["params"] = names[position : position + len(group["params"])]
        position += len(group["params"])
        groups.append(saved)
    extra: dict[str, Any] = {"meta": json.dumps(_meta(state, names, separate)),
                             "num_skipped_steps": opt.num_skipped_steps}
    if separate:
        extra["master_weights"] = masters
    return {"state": out, "param_groups": groups, "shardopt": extra}


def check_meta(meta: Mapping[str, Any], model: nn.Module, optimizer: Any) -> None:
    """Raise ``ValueError`` naming the first difference between a checkpoint's integrity record
    and this model and optimizer (a ZeroOptimizer or a single-process shardopt optimizer):
    format, parameter names (by position), shapes, groups, rules."""
    if isinstance(optimizer, RuleOptimizer):
        from .rule_state import describe_rule_optimizer

        check_described(meta, describe_rule_optimizer(model, optimizer))
        return
    opt = _check_optimizer(optimizer)
    check_described(meta, _meta(opt.sharded_state(), param_names(model, opt), False))


def _size_of(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, Tensor) else tuple(torch.as_tensor(value).shape)


def set_optimizer_state_dict(model: nn.Module, optimizer: ZeroOptimizer | RuleOptimizer,
                             state_dict: Mapping[str, Any]) -> None:
    """Load ``state_dict`` (from :func:`get_optimizer_state_dict` at any world size, filled by
    ``dcp.load``; or with full plain tensors per parameter, e.g. a ``dcp_to_torch_save`` file's
    ``"optim"`` entry) into this rank's areas.

    Everything is checked before anything changes: the integrity record (rule,
    parameter names, shapes), the param groups' names, every state's name and
    shape, per-parameter steps against the one step each storage keeps, and that
    this rank's pieces are covered. The errors name the parameter. Not a
    collective; no ``step()`` and no gather. Tensors that already are this
    optimizer's memory (``dcp.load`` into :func:`get_optimizer_state_dict`) are not copied.

    A dict without the ``"shardopt"`` entry (torch.optim's, e.g. from FSDP2 and
    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``) has no
    integrity record and no fp32 master weights: where this optimizer keeps them
    apart from lower-precision parameters they are taken from the model's
    parameters (load the model first), and parameters without state start from
    the rule's initial values, as in torch.optim.

    A single-process shardopt optimizer loads through torch's
    ``set_optimizer_state_dict`` after the same integrity check (:mod:`.rule_state`).
    """
    if isinstance(optimizer, RuleOptimizer):
        from .rule_state import set_rule_state_dict

        set_rule_state_dict(model, optimizer, state_dict)
        return
    opt = _check_optimizer(optimizer)
    state = opt.sharded_state()
    names = param_names(model, opt)
    meta = read_meta(state_dict)
    if meta is not None:
        check_meta(meta, model, opt)
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(state.param_groups):
        count = len(saved_groups) if isinstance(saved_groups, list) else saved_groups
        raise ValueError(f"Invalid state_dict: {count} param groups, this optimizer has {len(state.param_groups)}")
    position = 0
    for g, (saved, group) in enumerate(zip(saved_groups, state.param_groups)):
        ours = names[position : position + len(group["params"])]
        position += len(group["params"])
        for fqn_saved, fqn in zip(list(saved["params"]) + [None] * len(ours), ours):
            if fqn_saved != fqn:
                raise ValueError(f"Invalid state_dict: param group {g} lists {fqn_saved!r} where this optimizer "
                                 f"has {fqn!r}")
        if len(saved["params"]) != len(ours):
            raise ValueError(f"Invalid state_dict: param group {g} has {len(saved['params'])} parameters, "
                             f"this optimizer's has {len(ours)}")
    index_of = {name: index for index, name in enumerate(names)}
    entries: dict[int, dict[str, Any]] = {}
    for fqn, entry in state_dict.get("state", {}).items():
        if fqn not in index_of:
            raise ValueError(f"Invalid state_dict: state for {fqn!r}, which is not a parameter of this optimizer")
        entries[index_of[fqn]] = dict(entry)
    # No "shardopt" entry: a torch.optim checkpoint (e.g. FSDP2's), which keeps no separate fp32
    # master weights; they start from the model's parameters (loaded first, see docs).
    extra = state_dict.get("shardopt")
    params = dict(model.named_parameters()) if extra is None else None
    extra = extra or {}
    before = [dict(group) for group in state.param_groups]
    for saved, group in zip(saved_groups, state.param_groups):
        group.update({key: value for key, value in saved.items() if key != "params"})
    try:
        # The rule's state names depend on the saved hyperparameters: checked with them applied.
        masters = extra.get("master_weights") if params is None else {
            fqn: params[fqn].detach() for fqn in names}
        fills, copies, scalars = _plan_load(state, names, entries, masters)
    except Exception:
        for group, old in zip(state.param_groups, before):
            group.clear()
            group.update(old)
        raise
    with torch.no_grad():
        for target, value in fills:
            target.fill_(value)
        for target, source in copies:
            target.copy_(source)
        for buffers in state.storages:
            for name, value in scalars[buffers.storage.index].items():
                buffers.states[name].fill_(value)
    if "num_skipped_steps" in extra:
        opt.num_skipped_steps = int(extra["num_skipped_steps"])


def _plan_load(state: ShardedState, names: list[str], entries: dict[int, dict[str, Any]],
               masters: Mapping[str, Any] | None) -> tuple[list, list, dict[int, dict[str, float]]]:
    """Check everything and list the fills and copies that load it (nothing changes here
    except that states the first step would allocate are allocated)."""
    for info in state.plan.params:
        if info.index in entries:
            check_entry(names[info.index], info.shape, entries[info.index], state.specs(info.group), _size_of)
    scalars = {s.index: storage_scalars(state, s, entries, lambda i: names[i]) for s in state.plan.storages}
    fills: list[tuple[Tensor, float]] = []
    copies: list[tuple[Tensor, Tensor]] = []

    def add(target: Tensor, start: int, source: Any, what: str) -> None:
        found = copies_into(target, start, source)
        if found is None:
            raise ValueError(f"Invalid state_dict: {what} does not cover elements [{start}, "
                             f"{start + target.numel()}) that this rank holds")
        copies.extend(found)

    for buffers in state.storages:
        state.ensure_states(buffers)
        separate = buffers.master_separate()
        for piece in buffers.storage.pieces(state.comm.rank):
            fqn = names[piece.param]
            entry = entries.get(piece.param, {})
            for spec in state.specs(buffers.storage.group):
                if spec.shape is StateShape.SCALAR:
                    continue
                target = buffers.states[spec.name][piece.offset : piece.offset + piece.numel]
                if entry.get(spec.name) is None:
                    fills.append((target, spec.init))
                else:
                    add(target, piece.param_offset, entry[spec.name], f"state {spec.name!r} of {fqn}")
            if separate:
                if masters is None or fqn not in masters:
                    raise ValueError(f"Invalid state_dict: no fp32 master weights for {fqn} (this optimizer keeps "
                                     "them apart from its lower-precision parameters; the checkpoint did not)")
                target = buffers.master[piece.offset : piece.offset + piece.numel]
                add(target, piece.param_offset, masters[fqn], f"the master weights of {fqn}")
    return fills, copies, scalars


class OptimizerState:
    """A ``torch.distributed.checkpoint.stateful.Stateful`` for a shardopt optimizer (a ZeroOptimizer,
    or e.g. ``shardopt.Muon`` on FSDP2) and its model::

        dcp.save({"model": model.state_dict(), "optim": OptimizerState(model, opt)}, checkpoint_id=path)
        dcp.load({"model": model.state_dict(), "optim": OptimizerState(model, opt)}, checkpoint_id=path)

    ``dcp.load`` asks :meth:`state_dict` for the tensors to read into (this
    rank's areas) and hands the result to :meth:`load_state_dict`.
    """

    def __init__(self, model: nn.Module, optimizer: ZeroOptimizer | RuleOptimizer) -> None:
        self.model = model
        self.optimizer = optimizer if isinstance(optimizer, RuleOptimizer) else _check_optimizer(optimizer)

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)
