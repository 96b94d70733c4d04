"""One step of a matrix rule (Muon) on this rank's area of a matrix storage.

The plan (:mod:`shardopt.plan`) lays a param group's matrices end to end and
cuts them into equal per-rank areas, so a few matrices ("straddlers") lie in
two or more ranks' areas. Per step, on every rank (Jordan 2024 for the rule;
the layout is shardopt's, see ``docs/design/muon-at-scale.md``)::

    prepare    elementwise state update over the whole area (Muon: momentum),
               where each element lives
    exchange   each straddler's non-owning members send their slice of its
               direction (Muon: the Nesterov update) to its owner (one
               all-to-all with uneven parts for all straddlers)
    transform  every rank transforms the matrices it owns, whole, once in the
               whole job (Muon: Newton-Schulz), batched by shape
    return     each owner sends every other member its slice of the result
               (a second all-to-all)
    finish     elementwise: each rank applies its slices to its master weights

Matrices inside one area need no exchange. The exchange moves, per step and
rank, what :meth:`ShardPlan.exchange_numel` reports, and nothing when the plan
has no straddler (``matrix_layout="whole"``, or a cut on matrix boundaries).
Every rank calls the two all-to-alls for a storage with straddlers, even with
nothing to send: the plan, identical on all ranks, decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .buffers import StorageBuffers
from .comm import Communicator
from .plan import Piece, ShardPlan
from .rules.base import MatrixRule


def _slice_state(state: Mapping[str, Tensor], start: int, numel: int) -> dict[str, Tensor]:
    return {name: t if t.dim() == 0 else t[start : start + numel] for name, t in state.items()}


def matrix_step(
    rule: MatrixRule,
    hp: Mapping[str, Any],
    buffers: StorageBuffers,
    grad: Tensor,
    plan: ShardPlan,
    comm: Communicator,
) -> None:
    """Update ``buffers.master`` (this rank's area) from ``grad`` (its averaged gradient)."""
    storage, rank = buffers.storage, comm.rank
    used = buffers.used_numel
    master, state = buffers.master[:used], buffers.states
    if used:
        rule.prepare([master], [grad], [state], hp)
    pieces = {piece.param: piece for piece in storage.pieces(rank)}
    straddlers = [s for s in plan.straddlers if s.storage == storage.index]
    shape_of = {slot.param: plan.param(slot.param).shape for slot in storage.slots}

    def direction(piece: Piece) -> Tensor:
        at, numel = piece.region_offset, piece.numel
        return rule.direction(grad[at : at + numel], _slice_state(state, at, numel), hp).reshape(-1)

    def part_bounds(param: int, member: int) -> tuple[int, int]:
        """``[start, end)`` of ``param``'s flattened elements in ``member``'s area."""
        return next((low, high) for rank, low, high in storage.parts(param) if rank == member)

    # Exchange 1: members send their slices of the directions to the owner.
    assembled: dict[int, Tensor] = {}
    if straddlers:
        to = [[] for _ in range(comm.world_size)]
        from_counts = [0] * comm.world_size
        for straddler in straddlers:
            if rank in straddler.members and rank != straddler.owner:
                to[straddler.owner].append(direction(pieces[straddler.param]))
            if rank == straddler.owner:
                for member in straddler.members:
                    if member != rank:
                        low, high = part_bounds(straddler.param, member)
                        from_counts[member] += high - low
        received = _exchange(comm, to, from_counts, master)
        cursor = [sum(from_counts[:r]) for r in range(comm.world_size)]
        for straddler in straddlers:
            if rank != straddler.owner:
                continue
            full = torch.empty(plan.param(straddler.param).numel, dtype=master.dtype, device=master.device)
            for member in straddler.members:
                low, high = part_bounds(straddler.param, member)
                if member == rank:
                    full[low:high].copy_(direction(pieces[straddler.param]))
                else:
                    full[low:high].copy_(received[cursor[member] : cursor[member] + high - low])
                    cursor[member] += high - low
            assembled[straddler.param] = full

    # Transform what this rank owns; apply whole matrices at once.
    owned = [p for p, piece in pieces.items() if piece.numel == plan.param(p).numel] + list(assembled)
    results: dict[int, Tensor] = {}
    for batch in rule.batches([shape_of[p] for p in owned], hp):
        params = [owned[i] for i in batch]
        inputs = [
            (assembled[p] if p in assembled else direction(pieces[p])).view(shape_of[p]) for p in params
        ]
        for param, update in zip(params, rule.transform(inputs, hp)):
            if param in assembled:
                results[param] = update.reshape(-1)
            else:
                piece = pieces[param]
                rule.finish(master[piece.region_offset : piece.region_offset + piece.numel], update,
                            shape_of[param], hp)
        del inputs

    # Exchange 2: owners return each member its slice of the result.
    if straddlers:
        to = [[] for _ in range(comm.world_size)]
        from_counts = [0] * comm.world_size
        for straddler in straddlers:
            if rank == straddler.owner:
                for member in straddler.members:
                    if member != rank:
                        low, high = part_bounds(straddler.param, member)
                        to[member].append(results[straddler.param][low:high])
            elif rank in straddler.members:
                from_counts[straddler.owner] += pieces[straddler.param].numel
        received = _exchange(comm, to, from_counts, master)
        cursor = [sum(from_counts[:r]) for r in range(comm.world_size)]
        for straddler in straddlers:
            if rank not in straddler.members:
                continue
            piece = pieces[straddler.param]
            if rank == straddler.owner:
                low, high = part_bounds(straddler.param, rank)
                update = results[straddler.param][low:high]
            else:
                owner = straddler.owner
                update = received[cursor[owner] : cursor[owner] + piece.numel]
                cursor[owner] += piece.numel
            rule.finish(master[piece.region_offset : piece.region_offset + piece.numel], update,
                        shape_of[straddler.param], hp)


def _exchange(comm: Communicator, to: list[list[Tensor]], from_counts: list[int], like: Tensor) -> Tensor:
    send_counts = [sum(t.numel() for t in parts) for parts in to]
    flat = [t for parts in to for t in parts]
    send = torch.cat(flat) if flat else like.new_empty(0)
    return comm.exchange(send, send_counts, from_counts)
