"""Shard plans: pure data saying where every parameter lives on every rank.

A plan is computed identically on every rank, and offline by the memory
planner, from parameter shapes alone: ints and strings, no tensors and no
process group (habit 3 of the design, after torchtitan's split of its Muon
reshard schedule from its runtime). The runtime allocates what the plan says
and the planner multiplies the same plan by the rules' state declarations.

Two levels:

* A :class:`Storage` is where parameters live: a flat buffer of ``world_size``
  equal *areas*; rank ``r`` owns area ``r`` (its fp32 master weights, its
  optimizer state and, at stage 2, its averaged gradients). Every parameter is
  one contiguous view of a storage.
* A :class:`Bucket` is one collective: chunk ``k`` of every area of a storage,
  ``[area 0 chunk k | area 1 chunk k | ...]``. That is what
  ``reduce_scatter_tensor`` needs (equal contiguous per-rank regions), and the
  reduce-scatter hands rank ``r`` exactly chunk ``k`` of its own area.

How the parameters are placed (elementwise packing, the balanced and whole
matrix layouts) is :mod:`shardopt.zero.layout`; this module holds the data model,
its validation and its reports.

Areas are padded to a multiple of ``align_numel`` elements; the plan reports
every padding element, the straddlers, their exchange volume and each rank's
Newton-Schulz cost.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..rules.base import Granularity

# 2^22 elements (16 MiB fp32): what the stage-2 window and its pooled buffers hold
# per bucket (shardopt.zero.policy.MAX_IN_FLIGHT); DDP's default is 25 MiB.
DEFAULT_BUCKET_NUMEL = 1 << 22
DEFAULT_ALIGN_NUMEL = 64


@dataclass(frozen=True)
class ParamInfo:
    """What the plan needs to know of one parameter.

    ``transform_cost``: multiply-adds per step of its matrix rule's whole-matrix
    transform (Muon: Newton-Schulz), as the rule declares it
    (:meth:`~shardopt.rules.base.MatrixRule.transform_cost`); the matrix layouts
    balance it over ranks. Required for ``Granularity.MATRIX`` parameters.
    """

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    group: int
    granularity: Granularity = Granularity.ELEMENTWISE
    transform_cost: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        return f"{self.name} shape={self.shape} dtype={self.dtype} group={self.group}"


@dataclass(frozen=True)
class Span:
    """Elements ``[param_offset, param_offset + numel)`` of flattened parameter ``param``
    sit at ``[offset, offset + numel)`` of a buffer: a storage, a bucket, or one
    rank's area or region of either (each use says which)."""

    param: int
    offset: int
    numel: int
    param_offset: int = 0


def _spans_in(slots: Sequence[Span], starts: Sequence[int], start: int, end: int) -> tuple[Span, ...]:
    """The parts of ``slots`` (sorted by offset, ``starts`` their offsets) inside ``[start, end)``,
    with offsets relative to ``start``."""
    found = []
    position = max(0, bisect.bisect_right(starts, start) - 1)
    for slot in slots[position:]:
        if slot.offset >= end:
            break
        low, high = max(start, slot.offset), min(end, slot.offset + slot.numel)
        if low < high:
            found.append(Span(slot.param, low - start, high - low, slot.param_offset + low - slot.offset))
    return tuple(found)


@dataclass(frozen=True)
class Storage:
    """``world_size`` equal areas of ``area_numel`` elements holding whole parameters.

    ``slots`` are sorted by offset. ``ns_owners[i]`` (matrix storages) is the rank
    that orthogonalizes ``slots[i]``'s matrix. ``reduce_per_matrix``: gradients
    are reduced matrix by matrix as each arrives (stage 2: to the ranks holding
    it; stage 1: all-reduced where ``p.grad`` views it), not by bucket; the
    buckets then only all-gather the new weights.
    """

    index: int
    group: int
    granularity: Granularity
    dtype: str
    slots: tuple[Span, ...]
    area_numel: int
    world_size: int
    num_chunks: int = 1
    ns_owners: tuple[int, ...] = ()
    reduce_per_matrix: bool = False

    @property
    def flat_numel(self) -> int:
        return self.area_numel * self.world_size

    @property
    def chunk_numel(self) -> int:
        return self.area_numel // self.num_chunks

    @property
    def used_numel(self) -> int:
        return sum(slot.numel for slot in self.slots)

    @property
    def padding_numel(self) -> int:
        return self.flat_numel - self.used_numel

    @functools.cached_property
    def _starts(self) -> tuple[int, ...]:
        return tuple(slot.offset for slot in self.slots)

    def area_bounds(self, rank: int) -> tuple[int, int]:
        return rank * self.area_numel, (rank + 1) * self.area_numel

    def pieces(self, rank: int) -> tuple[Span, ...]:
        """Parameter pieces inside ``rank``'s area, in area order."""
        return _spans_in(self.slots, self._starts, *self.area_bounds(rank))

    def used_area_numel(self, rank: int) -> int:
        """Elements of ``rank``'s area from its first element to its last used one."""
        pieces = self.pieces(rank)
        return pieces[-1].offset + pieces[-1].numel if pieces else 0

    @functools.cached_property
    def _position(self) -> dict[int, int]:
        return {slot.param: position for position, slot in enumerate(self.slots)}

    def slot_offset(self, param: int) -> int:
        return self.slots[self._position[param]].offset

    def parts(self, param: int) -> list[tuple[int, int, int]]:
        """``(rank, start, end)``: elements ``[start, end)`` of flattened ``param`` lie in ``rank``'s area."""
        slot = self.slots[self._position[param]]
        out = []
        for rank in self.members(self._position[param]):
            low = max(slot.offset, rank * self.area_numel)
            high = min(slot.offset + slot.numel, (rank + 1) * self.area_numel)
            out.append((rank, low - slot.offset, high - slot.offset))
        return out

    def members(self, position: int) -> tuple[int, ...]:
        """Ranks whose areas hold part of ``slots[position]``."""
        slot = self.slots[position]
        if slot.numel == 0:
            return (min(slot.offset // max(1, self.area_numel), self.world_size - 1),)
        first = slot.offset // self.area_numel
        last = (slot.offset + slot.numel - 1) // self.area_numel
        return tuple(range(first, last + 1))

    def chunk_slots(self, chunk: int) -> tuple[Span, ...]:
        """Slots of the bucket made of chunk ``chunk`` of every area."""
        size = self.chunk_numel
        out = []
        for rank in range(self.world_size):
            start = rank * self.area_numel + chunk * size
            for piece in _spans_in(self.slots, self._starts, start, start + size):
                out.append(Span(piece.param, rank * size + piece.offset, piece.numel, piece.param_offset))
        return tuple(out)


@dataclass(frozen=True)
class Bucket:
    """One collective over ``storage``: chunk ``chunk`` of every area.

    Its flat buffer is ``world_size * region_numel`` elements; rank ``r``'s region
    ``[r * region_numel, (r+1) * region_numel)`` is chunk ``chunk`` of area ``r``.
    """

    index: int
    storage: Storage = field(repr=False, compare=False)
    chunk: int = 0

    @property
    def granularity(self) -> Granularity:
        return self.storage.granularity

    @property
    def world_size(self) -> int:
        return self.storage.world_size

    @property
    def region_numel(self) -> int:
        return self.storage.chunk_numel

    @property
    def flat_numel(self) -> int:
        return self.region_numel * self.world_size

    @property
    def area_offset(self) -> int:
        """Where each rank's region of this bucket starts inside its storage area."""
        return self.chunk * self.region_numel

    @functools.cached_property
    def slots(self) -> tuple[Span, ...]:
        if self.storage.num_chunks == 1:
            return self.storage.slots
        return self.storage.chunk_slots(self.chunk)

    @property
    def used_numel(self) -> int:
        return sum(slot.numel for slot in self.slots)

    @property
    def padding_numel(self) -> int:
        return self.flat_numel - self.used_numel

    def region_bounds(self, rank: int) -> tuple[int, int]:
        return rank * self.region_numel, (rank + 1) * self.region_numel

    def pieces(self, rank: int) -> tuple[Span, ...]:
        """Parameter pieces inside ``rank``'s region, in region order."""
        return _spans_in(self.slots, [s.offset for s in self.slots], *self.region_bounds(rank))


@dataclass(frozen=True)
class Straddler:
    """A matrix whose elements lie in the areas of several ranks (``members``)."""

    param: int
    storage: int
    members: tuple[int, ...]
    owner: int
    parts: tuple[int, ...]  # elements in each member's area


@dataclass(frozen=True)
class ShardPlan:
    world_size: int
    params: tuple[ParamInfo, ...]
    storages: tuple[Storage, ...]
    buckets: tuple[Bucket, ...]
    bucket_numel: int
    align_numel: int
    matrix_layout: str = "balanced"
    notes: tuple[str, ...] = field(default=())

    @property
    def used_numel(self) -> int:
        return sum(storage.used_numel for storage in self.storages)

    @property
    def padding_numel(self) -> int:
        return sum(storage.padding_numel for storage in self.storages)

    @property
    def flat_numel(self) -> int:
        return sum(storage.flat_numel for storage in self.storages)

    def param(self, index: int) -> ParamInfo:
        return self._by_index[index]

    @functools.cached_property
    def _by_index(self) -> dict[int, ParamInfo]:
        return {info.index: info for info in self.params}

    def fingerprint(self) -> str:
        """A digest of everything that must agree across ranks and checkpoints."""
        buckets = tuple((b.index, b.storage.index, b.chunk) for b in self.buckets)
        text = repr((self.world_size, self.params, self.storages, buckets))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @functools.cached_property
    def straddlers(self) -> tuple[Straddler, ...]:
        found = []
        for storage in self.storages:
            if storage.granularity is not Granularity.MATRIX:
                continue
            for position, slot in enumerate(storage.slots):
                parts = storage.parts(slot.param)
                if len(parts) > 1:
                    found.append(Straddler(slot.param, storage.index, tuple(rank for rank, _, _ in parts),
                                           storage.ns_owners[position], tuple(high - low for _, low, high in parts)))
        return tuple(found)

    def exchange_numel(self, rank: int) -> int:
        """Elements ``rank`` sends per step to orthogonalize straddling matrices.

        A member that does not orthogonalize sends its part of the update to the
        owner; the owner sends every other member its part of the result.
        """
        return self._exchange_numels[rank]

    @functools.cached_property
    def _exchange_numels(self) -> tuple[int, ...]:
        # Every rank's in one pass over the straddlers (a pass per rank is quadratic).
        sent = [0] * self.world_size
        for straddler in self.straddlers:
            for member, part in zip(straddler.members, straddler.parts):
                if member != straddler.owner:
                    sent[member] += part  # the member's part of the update, to the owner
                    sent[straddler.owner] += part  # and the owner's result, back
        return tuple(sent)

    def owned_matrices(self, rank: int) -> tuple[ParamInfo, ...]:
        """The matrices ``rank`` transforms (Muon: orthogonalizes), in storage order."""
        return tuple(
            self._by_index[slot.param]
            for storage in self.storages if storage.granularity is Granularity.MATRIX
            for slot, owner in zip(storage.slots, storage.ns_owners) if owner == rank
        )

    def transform_cost(self, rank: int) -> int:
        """Multiply-adds of matrix transforms (Muon: Newton-Schulz) ``rank`` runs per step."""
        return sum(info.transform_cost or 0 for info in self.owned_matrices(rank))

    def matrix_balance(self) -> dict[str, float]:
        """Balance of the matrix storages over ranks: state, Newton-Schulz cost, exchange.

        ``state_max_over_mean``: busiest rank's used area over the mean used
        area; ``ns_max_over_mean``: the same for Newton-Schulz cost, with
        ``ns_lower_bound`` the largest single matrix's cost over the mean (no
        plan that orthogonalizes each matrix once on one rank can beat it);
        ``padding_fraction``: padding over used elements; ``exchange_max_numel``.
        """
        matrix = [s for s in self.storages if s.granularity is Granularity.MATRIX]
        if not matrix:
            return {}
        ranks = range(self.world_size)
        used = [sum(s.used_area_numel(r) for s in matrix) for r in ranks]
        cost = [self.transform_cost(r) for r in ranks]
        largest = max(self._by_index[slot.param].transform_cost or 0 for s in matrix for slot in s.slots)
        mean_used, mean_cost = sum(used) / len(used), sum(cost) / len(cost)
        total = sum(s.used_numel for s in matrix)
        return {
            "state_max_over_mean": max(used) / mean_used if mean_used else 1.0,
            "ns_max_over_mean": max(cost) / mean_cost if mean_cost else 1.0,
            "ns_lower_bound": max(1.0, largest / mean_cost) if mean_cost else 1.0,
            "padding_fraction": sum(s.padding_numel for s in matrix) / total if total else 0.0,
            "num_straddlers": float(len(self.straddlers)),
            "exchange_max_numel": float(max(self.exchange_numel(r) for r in ranks)),
        }

    def describe(self) -> str:
        lines = [
            f"ShardPlan: world_size={self.world_size}, {len(self.params)} parameters, "
            f"{len(self.storages)} storages, {len(self.buckets)} buckets, {self.used_numel:,} elements + "
            f"{self.padding_numel:,} padding ({100 * self.padding_numel / max(1, self.flat_numel):.2f}%)"
        ]
        for storage in self.storages:
            lines.append(
                f"  storage {storage.index}: group {storage.group}, {storage.granularity.value}, "
                f"{len(storage.slots)} params, area {storage.area_numel:,} x {storage.world_size} "
                f"in {storage.num_chunks} chunk(s), padding {storage.padding_numel:,}"
            )
        balance = self.matrix_balance()
        if balance:
            lines.append(
                f"  matrices ({self.matrix_layout}): state max/mean {balance['state_max_over_mean']:.3f}, "
                f"Newton-Schulz max/mean {balance['ns_max_over_mean']:.3f} (bound "
                f"{balance['ns_lower_bound']:.3f}), {int(balance['num_straddlers'])} straddlers, "
                f"exchange <= {int(balance['exchange_max_numel']):,} elements/rank/step"
            )
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])

    def validate(self) -> None:
        """Check the plan's invariants; raise :class:`PlanError` naming the first one broken.

        Plans come from :func:`plan_shards`, but also from checkpoints and from the
        planner; a broken one would place two parameters on the same elements or
        leave one without a reduction, and train silently wrong.
        """
        seen: set[int] = set()
        by_index = self._by_index
        for storage in self.storages:
            where = f"storage {storage.index}"
            _require(storage.area_numel % self.align_numel == 0 or storage.area_numel == 0,
                     f"{where}: area of {storage.area_numel} elements is not a multiple of align_numel "
                     f"{self.align_numel}")
            _require(storage.area_numel % storage.num_chunks == 0,
                     f"{where}: area of {storage.area_numel} elements does not split into {storage.num_chunks} chunks")
            end = 0
            for slot in storage.slots:
                _require(slot.offset >= end, f"{where}: overlapping or unsorted slots at parameter {slot.param}")
                _require(slot.param not in seen, f"{where}: parameter {slot.param} placed twice")
                _require(slot.param in by_index, f"{where}: parameter {slot.param} is not in the plan's parameters")
                _require(slot.numel == by_index[slot.param].numel and slot.param_offset == 0,
                         f"{where}: parameter {slot.param} is not placed whole")
                seen.add(slot.param)
                end = slot.offset + slot.numel
            _require(end <= storage.flat_numel, f"{where}: slots end at {end}, past its {storage.flat_numel} elements")
            if storage.granularity is Granularity.MATRIX:
                _require(len(storage.ns_owners) == len(storage.slots),
                         f"{where}: {len(storage.ns_owners)} Newton-Schulz owners for {len(storage.slots)} matrices")
                for position, owner in enumerate(storage.ns_owners):
                    _require(owner in storage.members(position),
                             f"{where}: matrix {storage.slots[position].param} is orthogonalized by rank {owner}, "
                             f"which holds none of it")
                if self.matrix_layout == "whole":
                    _require(all(len(storage.members(p)) == 1 for p in range(len(storage.slots))),
                             f"{where}: a matrix crosses an area boundary in the whole layout")
        _require(seen == set(by_index), f"parameters {sorted(set(by_index) - seen)} are in no storage")
        chunks = sorted((b.storage.index, b.chunk) for b in self.buckets)
        _require(chunks == [(s.index, k) for s in self.storages for k in range(s.num_chunks)],
                 "the buckets do not cover every chunk of every storage exactly once")


class PlanError(ValueError):
    """A shard plan breaks one of its invariants (:meth:`ShardPlan.validate`)."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise PlanError(f"Invalid shard plan: {message}")

