"""One step of a matrix rule (Muon) on this rank's area of a matrix storage.

The plan (:mod:`shardopt.zero.plan`) lays a param group's matrices end to end and
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
from torch.profiler import record_function

from ..rules.base import MatrixRule
from .buffers import StorageBuffers
from .comm import Communicator
from .plan import ShardPlan, Span


def _slice_state(state: Mapping[str, Tensor], start: int, numel: int) -> dict[str, Tensor]:
    return {name: t if t.dim() == 0 else t[start : start + numel] for name, t in state.items()}


class MatrixStep:
    """The step of a matrix rule on this rank's area of one matrix storage.

    Everything the plan fixes (which pieces lie here, which matrices this rank
    transforms, who sends which slice to whom) is worked out once, here; a
    step only moves tensors.
    """

    def __init__(self, plan: ShardPlan, buffers: StorageBuffers, comm: Communicator) -> None:
        self.buffers, self.comm = buffers, comm
        storage, rank, world = buffers.storage, comm.rank, comm.world_size
        self.pieces: dict[int, Span] = {piece.param: piece for piece in storage.pieces(rank)}
        self.shape_of = {param: plan.param(param).shape for param in self.pieces}
        self.whole = [p for p, piece in self.pieces.items() if piece.numel == plan.param(p).numel]
        # Exchange 1: slices this rank sends (params, per owner) and, for the
        # straddlers it owns, the (member, start, end) parts to assemble.
        self.send: list[list[int]] = [[] for _ in range(world)]
        self.assemble: dict[int, list[tuple[int, int, int]]] = {}
        self.straddling = False
        for straddler in plan.straddlers:
            if straddler.storage != storage.index:
                continue
            self.straddling = True
            if rank == straddler.owner:
                self.assemble[straddler.param] = storage.parts(straddler.param)
            elif rank in straddler.members:
                self.send[straddler.owner].append(straddler.param)
        self.receive_counts = [0] * world
        for parts in self.assemble.values():
            for member, low, high in parts:
                if member != rank:
                    self.receive_counts[member] += high - low
        # Exchange 2 mirrors exchange 1: what was received is returned.
        self.return_counts = [sum(self.pieces[p].numel for p in params) for params in self.send]

    def __call__(self, rule: MatrixRule, hp: Mapping[str, Any], grad: Tensor) -> None:
        """Update the master weights of this rank's area from ``grad``, its averaged gradient."""
        rank = self.comm.rank
        used = self.buffers.used_numel
        master, state = self.buffers.master[:used], self.buffers.states
        if used:
            rule.prepare([master], [grad], [state], hp)

        def direction(param: int) -> Tensor:
            piece = self.pieces[param]
            at, numel = piece.offset, piece.numel
            return rule.direction(grad[at : at + numel], _slice_state(state, at, numel), hp).reshape(-1)

        def finish(param: int, update: Tensor) -> None:
            piece = self.pieces[param]
            rule.finish(master[piece.offset : piece.offset + piece.numel], update,
                        self.shape_of[param], hp)

        # Slices travel in the rule's exchange dtype, fixed by the hyperparameters and
        # so the same on every rank; a rank with nothing to send must not infer it
        # from its own (empty) tensors (docs/design/collectives.md).
        wire = rule.exchange_dtype(hp, master.dtype)

        # Exchange 1: members send their slices of the directions to the owner.
        assembled: dict[int, Tensor] = {}
        if self.straddling:
            received = self._exchange([[direction(p).to(wire) for p in params] for params in self.send],
                                      self.receive_counts, wire)
            cursor = [sum(self.receive_counts[:r]) for r in range(self.comm.world_size)]
            for param, parts in self.assemble.items():
                full = master.new_empty(parts[-1][2], dtype=wire)
                for member, low, high in parts:
                    if member == rank:
                        full[low:high].copy_(direction(param))
                    else:
                        full[low:high].copy_(received[cursor[member] : cursor[member] + high - low])
                        cursor[member] += high - low
                assembled[param] = full

        # Transform what this rank owns; apply whole matrices at once.
        owned = self.whole + list(assembled)
        results: dict[int, Tensor] = {}
        for batch in rule.batches([self.shape_of[p] for p in owned], hp):
            params = [owned[i] for i in batch]
            inputs = [(assembled[p] if p in assembled else direction(p)).view(self.shape_of[p]) for p in params]
            with record_function("shardopt.matrix_transform"):
                updates = rule.transform(inputs, hp)
            for param, update in zip(params, updates):
                if param in assembled:
                    results[param] = update.reshape(-1).to(wire)
                else:
                    finish(param, update)
            del inputs

        # Exchange 2: owners return each member its slice of the result.
        if self.straddling:
            back = [[] for _ in range(self.comm.world_size)]
            for param, parts in self.assemble.items():
                for member, low, high in parts:
                    if member == rank:
                        finish(param, results[param][low:high])
                    else:
                        back[member].append(results[param][low:high])
            received = self._exchange(back, self.return_counts, wire)
            cursor = 0
            for params in self.send:
                for param in params:
                    numel = self.pieces[param].numel
                    finish(param, received[cursor : cursor + numel])
                    cursor += numel

    def _exchange(self, to: list[list[Tensor]], from_counts: list[int], dtype: torch.dtype) -> Tensor:
        send_counts = [sum(t.numel() for t in parts) for parts in to]
        flat = [t for parts in to for t in parts]
        send = torch.cat(flat) if flat else self.buffers.master.new_empty(0, dtype=dtype)
        with record_function("shardopt.matrix_exchange"):
            return self.comm.exchange(send, send_counts, from_counts, dtype)
