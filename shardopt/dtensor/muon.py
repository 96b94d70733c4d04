"""A matrix rule (Muon) on DTensor parameters: each matrix transformed once, by one owner.

Muon (Jordan 2024) orthogonalizes each hidden matrix's momentum with
Newton-Schulz, which needs the matrix whole. On FSDP2 (``fully_shard``) or
tensor-parallel parameters every rank holds a shard of every matrix. Running
the rule on the DTensors makes DTensor redistribute inside every Newton-Schulz
matmul, every rank orthogonalizing every matrix. Here, per step and per mesh::

    prepare    B <- mu B + (1 - mu) G                 on the local shards (elementwise)
    direction  U = (1 - mu) G + mu B  (Nesterov)       on the local shards (elementwise)
    exchange   every rank sends its shard of U to the matrix's owner:
               ONE all_to_all_single, each rank's send buffer packed by destination
    transform  the owner assembles U whole from the shards' global indices and runs
               O = NS(U), batched by shape (rule.batches / rule.transform)
    return     a second all_to_all_single brings every holder its piece of O
    finish     theta <- (1 - lr wd) theta - lr s O     on the local shards

Owners: longest processing time first (Graham 1969) on ``rule.transform_cost``
over the matrices' global shapes, ties broken on the least elements then the
lowest rank, as the ZeRO engine's ``matrix_layout="whole"``
(``shardopt/zero/layout.py``): pure data, identical on every rank, so no
agreement is needed. microsoft/dion (``dion/muon.py``) and torchtitan's
DistMuon deal owners round-robin or by a heap of sizes; the same bucketed
``all_to_all_single`` both ways is theirs.

Bytes per rank and step: a rank sends its local Muon shard except the
matrices it owns, and receives the same volume back, ``2 (W - 1) / W`` of its
local shard on average, in the rule's :meth:`~shardopt.rules.base.MatrixRule.exchange_dtype`
(bf16 for the default ``ns_dtype``: Newton-Schulz casts to it first, so the
result does not change). Ranks replicating a piece (``Replicate`` mesh
dimensions) send it once and all receive the result. No all-gather, no
all-reduce, no DTensor dispatch: the rule sees ``to_local()`` tensors only.
Every rank of the mesh must step the same matrices in the same order (true for
``model.parameters()`` under FSDP2/TP): the exchange's split sizes come from
that shared list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.profiler import record_function

from ..rules.base import MatrixRule
from .pieces import Piece, group_coordinates, is_sender, mesh_group, piece_of

EXCHANGE_RANGE = "shardopt.dtensor_matrix_exchange"


def assign_owners(costs: Sequence[int], numels: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each matrix: longest processing time first on ``costs``, the rank
    with the least cost so far (then the fewest elements, then the lowest rank)."""
    load, fill = [0] * world_size, [0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], fill[r], r))
        owners[index] = rank
        load[rank] += costs[index]
        fill[rank] += numels[index]
    return owners


@dataclass
class ExchangePlan:
    """Everything a step of one mesh's matrices needs that shapes and placements fix.

    ``pieces[i][r]``: rank ``r``'s piece of matrix ``i``; ``senders[i][r]``: whether
    ``r`` sends it (the first of its replicas). ``out_*``/``in_*``: split sizes (in
    elements) of the first exchange on this rank; the return exchange swaps them
    except that owners return to every holder, replicas included.
    """

    group: dist.ProcessGroup | None
    rank: int
    world: int
    owners: list[int]
    pieces: list[list[Piece]]
    senders: list[list[bool]]
    out_counts: list[int]
    in_counts: list[int]
    back_out_counts: list[int]
    back_in_counts: list[int]

    @property
    def owned(self) -> list[int]:
        return [i for i, owner in enumerate(self.owners) if owner == self.rank]

    def bytes_per_step(self, itemsize: int) -> int:
        """Bytes this rank puts on the wire per step (both exchanges)."""
        return (sum(self.out_counts) + sum(self.back_out_counts)) * itemsize


_PLANS: dict[tuple, ExchangePlan] = {}


def exchange_plan(mesh, shapes: Sequence[tuple[int, ...]], placements: Sequence[tuple], costs: Sequence[int]
                  ) -> ExchangePlan:
    """The (cached) :class:`ExchangePlan` of matrices of ``shapes`` on ``mesh``."""
    key = (mesh, tuple(shapes), tuple(placements), tuple(costs))
    if key in _PLANS:
        return _PLANS[key]
    group = mesh_group(mesh)
    coords = group_coordinates(mesh, group)
    world, rank = len(coords), dist.get_rank(group)
    owners = assign_owners(costs, [int(torch.Size(s).numel()) for s in shapes], world)
    pieces = [[piece_of(shape, mesh.shape, c, place) for c in coords] for shape, place in zip(shapes, placements)]
    senders = [[is_sender(c, place) for c in coords] for place in placements]
    out, into, back_out, back_in = [0] * world, [0] * world, [0] * world, [0] * world
    for i, owner in enumerate(owners):
        for r in range(world):
            numel = pieces[i][r].numel
            if r == owner or not numel:
                continue
            if senders[i][r]:
                if r == rank:
                    out[owner] += numel
                if owner == rank:
                    into[r] += numel
            if owner == rank:
                back_out[r] += numel
            if r == rank:
                back_in[owner] += numel
    if len(_PLANS) > 64:  # shapes change rarely; bound the cache all the same
        _PLANS.clear()
    plan = _PLANS[key] = ExchangePlan(group, rank, world, owners, pieces, senders, out, into, back_out, back_in)
    return plan


def _all_to_all(send: Tensor, out_counts: list[int], in_counts: list[int], group) -> Tensor:
    received = send.new_empty(sum(in_counts))
    with record_function(EXCHANGE_RANGE):
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
    cursor = _offsets(plan.in_counts)
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
                piece.write(full, received[cursor[r]: cursor[r] + piece.numel])
                cursor[r] += piece.numel
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

    Parameters are grouped by mesh (in order of first appearance, the same on every
    rank) and each mesh's matrices take one :func:`mesh_matrix_step`. Plain tensors and
    DTensors whose gradient or state has another layout than the parameter (a
    ``Partial`` gradient, a state loaded whole) go to ``rule.update`` as they are.
    """
    from torch.distributed.tensor import DTensor

    from ..rules.local import _same_layout

    shapes_all = [tuple(p.shape) for p in params]
    scalars = getattr(rule, "host_scalars", None)
    if scalars is not None:  # Muon: lr-derived scalars read to the host once, not per matrix
        hp = scalars(hp, shapes_all)
    per_mesh: dict[Any, list[int]] = {}
    rest: list[int] = []
    for index, (param, grad, state) in enumerate(zip(params, grads, states)):
        if isinstance(param, DTensor) and _same_layout(DTensor, param, grad) and all(
                _same_layout(DTensor, param, v) if v.dim() else not isinstance(v, DTensor) for v in state.values()):
            per_mesh.setdefault(param.device_mesh, []).append(index)
        else:
            rest.append(index)
    if rest:
        rule.update([params[i] for i in rest], [grads[i] for i in rest], [states[i] for i in rest], hp)
    for mesh, indices in per_mesh.items():
        shapes = [shapes_all[i] for i in indices]
        placements = [tuple(params[i].placements) for i in indices]
        plan = exchange_plan(mesh, shapes, placements, [rule.transform_cost(s, hp) for s in shapes])
        local_states = [{k: v._local_tensor if v.dim() else v for k, v in states[i].items()} for i in indices]
        mesh_matrix_step(rule, plan, [params[i]._local_tensor for i in indices],
                         [grads[i]._local_tensor for i in indices], local_states, shapes, hp)
