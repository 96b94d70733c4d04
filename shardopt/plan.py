"""Shard plans: pure data saying where every parameter lives on every rank.

A plan is computed identically on every rank, and offline by the memory
planner, from parameter shapes alone: ints and strings, no tensors and no
process group (habit 3 of the design, after torchtitan's split of its Muon
reshard schedule from its runtime). The runtime allocates what the plan says
and the planner multiplies the same plan by the rules' state declarations.

Layout. Parameters are packed, in backward order (the reverse of registration
order, the order in which autograd usually produces gradients), into buckets
of one param group each. A bucket is a flat buffer of ``world_size *
region_numel`` elements; rank ``r`` owns the region ``[r * region_numel, (r+1) *
region_numel)``. This is what ``reduce_scatter_tensor`` and
``all_gather_into_tensor`` need: equal, contiguous per-rank regions.

* Elementwise rules: parameters are laid end to end and cut into equal spans
  wherever the cut falls (ZeRO, Rajbhandari et al. 2020, section 5).
* Matrix rules (Muon): each matrix is assigned whole to one owner rank, and the
  owner's matrices are laid out inside its own region, so the same
  reduce-scatter delivers each owner the full averaged gradient of its
  matrices, and the same all-gather shares the new weights.

Regions are padded to a multiple of ``align_numel`` elements so each rank's
region starts on an aligned address; the plan reports every padding element.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .rules.base import Granularity
from .rules.newton_schulz import matrix_shape, newton_schulz_flops

DEFAULT_BUCKET_NUMEL = 1 << 23
DEFAULT_ALIGN_NUMEL = 64


@dataclass(frozen=True)
class ParamInfo:
    """What the plan needs to know of one parameter."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    group: int
    granularity: Granularity = Granularity.ELEMENTWISE

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        return f"{self.name} shape={self.shape} dtype={self.dtype} group={self.group}"


@dataclass(frozen=True)
class Slot:
    """Parameter ``param`` occupies ``[offset, offset + numel)`` of its bucket."""

    param: int
    offset: int
    numel: int


@dataclass(frozen=True)
class Piece:
    """The part of a parameter inside one rank's region.

    Elements ``[param_offset, param_offset + numel)`` of the flattened parameter
    sit at ``[region_offset, region_offset + numel)`` of the region.
    """

    param: int
    param_offset: int
    region_offset: int
    numel: int


@dataclass(frozen=True)
class Bucket:
    index: int
    group: int
    granularity: Granularity
    dtype: str
    slots: tuple[Slot, ...]
    region_numel: int
    world_size: int
    owners: tuple[int, ...] = ()  # matrix rules: owner rank of each slot

    @property
    def flat_numel(self) -> int:
        return self.region_numel * self.world_size

    @property
    def used_numel(self) -> int:
        return sum(slot.numel for slot in self.slots)

    @property
    def padding_numel(self) -> int:
        return self.flat_numel - self.used_numel

    def region_bounds(self, rank: int) -> tuple[int, int]:
        return rank * self.region_numel, (rank + 1) * self.region_numel

    def pieces(self, rank: int) -> tuple[Piece, ...]:
        """Parameter pieces inside ``rank``'s region, in region order."""
        start, end = self.region_bounds(rank)
        found = []
        for slot in self.slots:
            low, high = max(start, slot.offset), min(end, slot.offset + slot.numel)
            if low < high:
                found.append(Piece(slot.param, low - slot.offset, low - start, high - low))
        return tuple(found)

    def used_region_numel(self, rank: int) -> int:
        """Elements of ``rank``'s region from its first element to its last used one."""
        pieces = self.pieces(rank)
        return pieces[-1].region_offset + pieces[-1].numel if pieces else 0


@dataclass(frozen=True)
class ShardPlan:
    world_size: int
    params: tuple[ParamInfo, ...]
    buckets: tuple[Bucket, ...]
    bucket_numel: int
    align_numel: int
    notes: tuple[str, ...] = field(default=())

    @property
    def used_numel(self) -> int:
        return sum(bucket.used_numel for bucket in self.buckets)

    @property
    def padding_numel(self) -> int:
        return sum(bucket.padding_numel for bucket in self.buckets)

    @property
    def flat_numel(self) -> int:
        return sum(bucket.flat_numel for bucket in self.buckets)

    def param(self, index: int) -> ParamInfo:
        return self._by_index()[index]

    def _by_index(self) -> dict[int, ParamInfo]:
        return {info.index: info for info in self.params}

    def fingerprint(self) -> str:
        """A digest of everything that must agree across ranks and checkpoints."""
        text = repr((self.world_size, self.params, self.buckets))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def newton_schulz_cost(self, rank: int, ns_steps: int = 5) -> int:
        """Multiply-adds of Newton-Schulz that ``rank`` runs per step under this plan."""
        by_index = self._by_index()
        total = 0
        for bucket in self.buckets:
            if bucket.granularity is not Granularity.MATRIX:
                continue
            for slot, owner in zip(bucket.slots, bucket.owners):
                if owner == rank:
                    shape = by_index[slot.param].shape
                    count = shape[0] if len(shape) == 3 else 1
                    total += count * newton_schulz_flops(*matrix_shape(shape), ns_steps)
        return total

    def describe(self) -> str:
        lines = [
            f"ShardPlan: world_size={self.world_size}, {len(self.params)} parameters, "
            f"{len(self.buckets)} buckets, {self.used_numel:,} elements + "
            f"{self.padding_numel:,} padding ({100 * self.padding_numel / max(1, self.flat_numel):.2f}%)"
        ]
        for bucket in self.buckets:
            lines.append(
                f"  bucket {bucket.index}: group {bucket.group}, {bucket.granularity.value}, "
                f"{len(bucket.slots)} params, region {bucket.region_numel:,} x {bucket.world_size}, "
                f"padding {bucket.padding_numel:,}"
            )
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])

    def validate(self) -> None:
        """Check the plan's invariants; raises AssertionError on a broken plan."""
        seen: set[int] = set()
        by_index = self._by_index()
        for bucket in self.buckets:
            assert bucket.region_numel % self.align_numel == 0 or bucket.region_numel == 0
            end = 0
            for slot in sorted(bucket.slots, key=lambda s: s.offset):
                assert slot.offset >= end, f"bucket {bucket.index}: overlapping slots"
                assert slot.param not in seen, f"parameter {slot.param} placed twice"
                assert slot.numel == by_index[slot.param].numel
                seen.add(slot.param)
                end = slot.offset + slot.numel
            assert end <= bucket.flat_numel
            if bucket.granularity is Granularity.MATRIX:
                for slot, owner in zip(bucket.slots, bucket.owners):
                    start, stop = bucket.region_bounds(owner)
                    assert start <= slot.offset and slot.offset + slot.numel <= stop
        assert seen == set(by_index), "some parameters are in no bucket"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _elementwise_bucket(
    index: int, group: int, dtype: str, members: Sequence[ParamInfo], world_size: int,
    align_numel: int,
) -> Bucket:
    slots, offset = [], 0
    for info in members:
        slots.append(Slot(info.index, offset, info.numel))
        offset += info.numel
    region = _round_up(-(-offset // world_size), align_numel)
    return Bucket(index, group, Granularity.ELEMENTWISE, dtype, tuple(slots), region, world_size)


def _matrix_bucket(
    index: int, group: int, dtype: str, members: Sequence[ParamInfo], world_size: int,
    align_numel: int, loads: list[int],
) -> Bucket:
    # Longest-processing-time-first (Graham 1969): the costliest matrix goes to
    # the rank with the least Newton-Schulz work so far, across all buckets (a
    # bucket with one large matrix would otherwise always land on rank 0);
    # deterministic, since ties break on the rank number.
    owner_of: dict[int, int] = {}
    for info in sorted(members, key=lambda i: (-_ns_cost(i), i.index)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner_of[info.index] = rank
        loads[rank] += _ns_cost(info)
    per_rank = [0] * world_size
    for info in members:
        per_rank[owner_of[info.index]] += info.numel
    region = _round_up(max(per_rank), align_numel)
    cursor = [rank * region for rank in range(world_size)]
    slots, owners = [], []
    for info in members:
        rank = owner_of[info.index]
        slots.append(Slot(info.index, cursor[rank], info.numel))
        owners.append(rank)
        cursor[rank] += info.numel
    return Bucket(index, group, Granularity.MATRIX, dtype, tuple(slots), region, world_size,
                  tuple(owners))


def _ns_cost(info: ParamInfo) -> int:
    count = info.shape[0] if len(info.shape) == 3 else 1
    return count * newton_schulz_flops(*matrix_shape(info.shape), 1)


def plan_shards(
    params: Sequence[ParamInfo],
    world_size: int,
    *,
    bucket_numel: int = DEFAULT_BUCKET_NUMEL,
    align_numel: int = DEFAULT_ALIGN_NUMEL,
) -> ShardPlan:
    """Pack ``params`` into buckets and cut each into ``world_size`` equal regions.

    Buckets never mix param groups, dtypes or granularities, and hold at most
    ``bucket_numel`` elements unless one parameter alone is larger. They are
    ordered by when backward completes them: the bucket whose earliest-registered
    parameter comes last is complete first.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size!r} (expected an int >= 1)")
    if bucket_numel < 1:
        raise ValueError(f"Invalid bucket_numel: {bucket_numel} (expected an int >= 1)")
    if align_numel < 1:
        raise ValueError(f"Invalid align_numel: {align_numel} (expected an int >= 1)")
    open_buckets: dict[tuple[int, str, Granularity], list[ParamInfo]] = {}
    closed: list[tuple[tuple[int, str, Granularity], list[ParamInfo]]] = []
    for info in sorted(params, key=lambda i: -i.index):
        key = (info.group, info.dtype, info.granularity)
        members = open_buckets.setdefault(key, [])
        if members and sum(m.numel for m in members) + info.numel > bucket_numel:
            closed.append((key, members))
            members = open_buckets[key] = []
        members.append(info)
    closed.extend((key, members) for key, members in open_buckets.items() if members)
    # Complete first = smallest minimum index last; sort by it, descending.
    closed.sort(key=lambda item: -min(m.index for m in item[1]))
    buckets = []
    ns_loads = [0] * world_size
    for index, ((group, dtype, granularity), members) in enumerate(closed):
        if granularity is Granularity.MATRIX:
            buckets.append(_matrix_bucket(index, group, dtype, members, world_size, align_numel, ns_loads))
        else:
            buckets.append(_elementwise_bucket(index, group, dtype, members, world_size, align_numel))
    plan = ShardPlan(world_size, tuple(params), tuple(buckets), bucket_numel, align_numel)
    plan.validate()
    return plan
