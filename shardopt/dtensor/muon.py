"""A matrix rule (Muon) on DTensor parameters: each matrix transformed once, by one owner.

Muon (Jordan 2024) orthogonalizes each hidden matrix's momentum with
Newton-Schulz, which needs the matrix whole. On FSDP2 (``fully_shard``) or
tensor-parallel parameters every rank holds a shard of every matrix. Running
the rule on the DTensors makes DTensor redistribute inside every Newton-Schulz
matmul, every rank orthogonalizing every matrix. Here, per step and per exchange
round::

    prepare    B <- mu B + (1 - mu) G                 on the local shards (elementwise)
    direction  U = (1 - mu) G + mu B  (Nesterov)       on the local shards (elementwise)
    exchange   every rank sends its shard of U to the matrix's owner:
               ONE all_to_all_single, each rank's send buffer packed by destination
    transform  the owner assembles U whole from the shards' global indices and runs
               O = NS(U), batched by shape (rule.batches / rule.transform)
    return     a second all_to_all_single brings every holder its piece of O
    finish     theta <- (1 - lr wd) theta - lr s O     on the local shards

Owners, exchange meshes and rounds are planned once per layout
(:mod:`shardopt.dtensor.exchange`): longest processing time first (Graham 1969)
on ``rule.transform_cost``, as the ZeRO engine's ``matrix_layout="whole"``; pure
data, identical on every rank, checked once by a fingerprint all-gather.
microsoft/dion (``dion/muon.py``) and torchtitan's DistMuon deal owners
round-robin or by a heap of sizes; the same bucketed ``all_to_all_single`` both
ways is theirs.

Bytes per rank and step: a rank sends its local Muon shard except the
matrices it owns, and receives the same volume back, ``2 (W - 1) / W`` of its
local shard on average, in the rule's :meth:`~shardopt.rules.base.MatrixRule.exchange_dtype`
(bf16 for the default ``ns_dtype``: Newton-Schulz casts to it first, so the
result does not change). Ranks replicating a piece (``Replicate`` mesh
dimensions) send it once and all receive the result. No all-gather, no
all-reduce, no DTensor dispatch: the rule sees ``to_local()`` tensors only.
Every rank of the mesh must step the same matrices in the same order (true for
``model.parameters()`` under FSDP2/TP): the exchange's split sizes come from
that shared list (a mismatch raises at the first step, naming it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.profiler import record_function

from ..rules.base import MatrixRule
from ..zero.comm import naming_failures
from .exchange import DEFAULT_BUCKET_NUMEL, ExchangePlan, exchange_layout, exchange_plans

EXCHANGE_RANGE = "shardopt.dtensor_matrix_exchange"


def _all_to_all(send: Tensor, out_counts: list[int], in_counts: list[int], group) -> Tensor:
    received = send.new_empty(sum(in_counts))
    with record_function(EXCHANGE_RANGE), naming_failures("Muon owner all-to-all", dist.get_rank(group),
                                                          dist.get_world_size(group)):
        dist.all_to_all_single(received, send, in_counts, out_counts, group=group)
    return received


def _offsets(counts: list[int]) -> list[int]:
    out, total = [], 0
    for count in counts:
        out.append(total)
        total += count
    return out


@torch.no_grad()
def mesh_matrix_step(rule: MatrixRule, plan: ExchangePlan, params: list[Tensor], grads: list[Tensor],
                     states: list[dict[str, Tensor]], shapes: list[tuple[int, ...]], hp: Mapping[str, Any]) -> None:
    """One step of ``rule`` on local shards ``params``/``grads``/``states`` of matrices of
    global ``shapes`` (one mesh), with ``plan``'s two all-to-alls."""
    rank, world = plan.rank, plan.world
    if params:
        rule.prepare(params, grads, states, hp)
    master = params[0].dtype if params else torch.float32
    wire = rule.exchange_dtype(hp, master)
    device = params[0].device
    # Exchange 1: pack each destination's part in matrix order (the owner unpacks in it).
    send = torch.empty(sum(plan.out_counts), dtype=wire, device=device)
    cursor = _offsets(plan.out_counts)
    mine: dict[int, Tensor] = {}
    for i, owner in enumerate(plan.owners):
        if not plan.senders[i][rank] or not params[i].numel():
            continue
        if owner == rank:
            mine[i] = rule.direction(grads[i], states[i], hp)
            continue
        numel = params[i].numel()
        send[cursor[owner]: cursor[owner] + numel].view(params[i].shape).copy_(
            rule.direction(grads[i], states[i], hp))
        cursor[owner] += numel
    received = _all_to_all(send, plan.out_counts, plan.in_counts, plan.group) if world > 1 else send
    del send

    # Assemble the owned matrices whole; transform them batched by shape.
    owned = plan.owned
    # Where each sender's piece of each owned matrix starts in ``received``: senders pack
    # in matrix order, while the batches below take the matrices grouped by shape.
    cursor = _offsets(plan.in_counts)
    starts: dict[tuple[int, int], int] = {}
    for i in owned:
        for r in range(world):
            piece = plan.pieces[i][r]
            if r != rank and piece.numel and plan.senders[i][r]:
                starts[i, r] = cursor[r]
                cursor[r] += piece.numel
    results: dict[int, Tensor] = {}
    for batch in rule.batches([shapes[i] for i in owned], hp):
        inputs = []
        for i in (owned[b] for b in batch):
            full = torch.empty(shapes[i], dtype=wire, device=device)
            for r in range(world):
                piece = plan.pieces[i][r]
                # Replicas (not senders) hold a copy of a sender's piece: written once.
                if not piece.numel or not plan.senders[i][r]:
                    continue
                if r == rank:
                    piece.write(full, mine.pop(i))
                    continue
                piece.write(full, received[starts[i, r]: starts[i, r] + piece.numel])
            inputs.append(full)
        with record_function("shardopt.matrix_transform"):
            updates = rule.transform(inputs, hp)
        del inputs
        for b, update in zip(batch, updates):
            results[owned[b]] = update.reshape(shapes[owned[b]])
    del received

    # Exchange 2: owners return every holder its piece, in matrix order.
    back = torch.empty(sum(plan.back_out_counts), dtype=wire, device=device)
    cursor = _offsets(plan.back_out_counts)
    for i in owned:
        for r in range(world):
            piece = plan.pieces[i][r]
            if r == rank or not piece.numel:
                continue
            back[cursor[r]: cursor[r] + piece.numel].view(piece.shape).copy_(piece.read(results[i]))
            cursor[r] += piece.numel
    returned = _all_to_all(back, plan.back_out_counts, plan.back_in_counts, plan.group) if world > 1 else back
    del back
    cursor = _offsets(plan.back_in_counts)
    for i, owner in enumerate(plan.owners):
        if not params[i].numel():
            continue
        if owner == rank:
            update = plan.pieces[i][rank].read(results.pop(i))
        else:
            update = returned[cursor[owner]: cursor[owner] + params[i].numel()]
            cursor[owner] += params[i].numel()
        rule.finish(params[i], update.reshape(params[i].shape), shapes[i], hp)


def dtensor_matrix_update(rule: MatrixRule, params: list[Tensor], grads: list[Tensor],
                          states: list[dict[str, Tensor]], hp: Mapping[str, Any]) -> None:
    """``rule.update`` for a param group whose parameters are DTensors (FSDP2, TP).

    Parameters are grouped by exchange mesh (:func:`~shardopt.dtensor.exchange.exchange_layout`:
    the root mesh for sub-meshes of it; in order of first appearance, the same on every
    rank) and each group's matrices take one :func:`mesh_matrix_step` per round of at
    most ``hp["exchange_bucket_numel"]`` elements per rank (default
    :data:`~shardopt.dtensor.exchange.DEFAULT_BUCKET_NUMEL`). Plain tensors and DTensors
    whose gradient or state has another layout than the parameter (a ``Partial``
    gradient, a state loaded whole) go to ``rule.update`` as they are.
    """
    from torch.distributed.tensor import DTensor

    from ..rules.local import _same_layout

    shapes_all = [tuple(p.shape) for p in params]
    scalars = getattr(rule, "host_scalars", None)
    if scalars is not None:  # Muon: lr-derived scalars read to the host once, not per matrix
        hp = scalars(hp, shapes_all)
    bucket_numel = hp.get("exchange_bucket_numel") or DEFAULT_BUCKET_NUMEL
    # exchange mesh -> [(index, placements there, the parameter's own mesh)]
    groups: dict[Any, list[tuple[int, tuple, Any]]] = {}
    rest: list[int] = []
    for index, (param, grad, state) in enumerate(zip(params, grads, states)):
        if isinstance(param, DTensor) and _same_layout(DTensor, param, grad) and all(
                _same_layout(DTensor, param, v) if v.dim() else not isinstance(v, DTensor) for v in state.values()):
            mesh, placements = exchange_layout(param.device_mesh, param.placements)
            groups.setdefault(mesh, []).append((index, placements, param.device_mesh))
        else:
            rest.append(index)
    if rest:
        rule.update([params[i] for i in rest], [grads[i] for i in rest], [states[i] for i in rest], hp)

    def run(mesh, indices: list[int], placements: list[tuple], strict: bool) -> bool:
        shapes = [shapes_all[i] for i in indices]
        plans = exchange_plans(mesh, shapes, placements, [rule.transform_cost(s, hp) for s in shapes],
                               bucket_numel, params[indices[0]].device, strict=strict)
        if plans is None:
            return False
        for plan in plans:
            chosen = [indices[i] for i in plan.indices]
            local_states = [{k: v._local_tensor if v.dim() else v for k, v in states[i].items()} for i in chosen]
            mesh_matrix_step(rule, plan, [params[i]._local_tensor for i in chosen],
                             [grads[i]._local_tensor for i in chosen], local_states,
                             [shapes_all[i] for i in chosen], hp)
        return True

    for mesh, entries in groups.items():
        lifted = any(own is not mesh for _, _, own in entries)
        if run(mesh, [i for i, _, _ in entries], [p for _, p, _ in entries], strict=not lifted):
            continue
        # The ranks of the root mesh hold different matrices (e.g. pipeline stages): each
        # matrix on its own mesh.
        own: dict[Any, list[int]] = {}
        for index, _, own_mesh in entries:
            own.setdefault(own_mesh, []).append(index)
        for own_mesh, indices in own.items():
            run(own_mesh, indices, [tuple(params[i].placements) for i in indices], strict=True)
