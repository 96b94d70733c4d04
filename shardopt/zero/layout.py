"""Placement: where :func:`plan_shards` puts every parameter (the algorithms behind a
:class:`~shardopt.zero.plan.ShardPlan`, which is pure data).

Elementwise rules (SGD ... AdamW): parameters are packed in backward order (the
reverse of registration order) into storages of about ``bucket_numel``
elements, laid end to end and cut into equal areas wherever the cut falls
(ZeRO, Rajbhandari et al. 2020, section 5); each such storage is one bucket.

Matrix rules (Muon) need each matrix whole for Newton-Schulz. A param group's
matrices form one storage (``docs/design/muon-at-scale.md``):

* ``matrix_layout="balanced"`` (default): the matrices are dealt to ``N``
  lists by Newton-Schulz cost (longest processing time first), each list
  ordered with its smallest matrices at both ends, the lists laid end to end,
  and the sequence cut into ``N`` areas of ``ceil(total / N)``. Every rank
  holds the same number of elements (padding: alignment only, at any ``N``);
  the few matrices that cross an area boundary ("straddlers", at most ``N -
  1`` boundaries, small ones by construction) keep their momentum where each
  part lives, and one member, chosen to balance Newton-Schulz cost,
  orthogonalizes the whole matrix after an exchange of the parts
  (:mod:`shardopt.zero.matrix_step`).
* ``matrix_layout="whole"``: every matrix inside one area (owners by
  longest-processing-time on Newton-Schulz cost); no exchange, but areas are
  as large as the busiest rank's matrices, and the rest is padding.

Gradients of a matrix storage at stage 2 are reduced matrix by matrix, each
part to the rank whose area holds it (:func:`shardopt.zero.schedule.reduce_units`), as
each matrix's gradient arrives: a bucket spanning every rank's area would wait
for gradients from all over the model (an area holds matrices of many
layers), and hold them meanwhile. The volume is the reduce-scatter's. The
buckets then only all-gather the new weights. At stage 1 (and on one rank) a
matrix storage is one bucket, all-reduced: the full averaged gradient is kept
there and ``p.grad`` views it.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Sequence

from ..rules.base import Granularity
from .plan import (
    DEFAULT_ALIGN_NUMEL,
    DEFAULT_BUCKET_NUMEL,
    Bucket,
    ParamInfo,
    ShardPlan,
    Span,
    Storage,
)

MATRIX_LAYOUTS = ("balanced", "whole")
# A matrix storage's chunk (its share of one bucket per rank) is at least this
# many elements (when bucket_numel is): at hundreds of ranks bucket_numel /
# world_size would otherwise cut matrices into thousands of tiny collectives.
MIN_CHUNK_NUMEL = 1 << 16


def _cost(info: ParamInfo) -> int:
    return info.transform_cost or 0


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _elementwise_storage(
    index: int, group: int, dtype: str, members: Sequence[ParamInfo], world_size: int, align_numel: int
) -> Storage:
    slots, offset = [], 0
    for info in members:
        slots.append(Span(info.index, offset, info.numel))
        offset += info.numel
    area = _round_up(-(-offset // world_size), align_numel)
    return Storage(index, group, Granularity.ELEMENTWISE, dtype, tuple(slots), area, world_size)


def _chunking(area: int, world_size: int, bucket_numel: int, align_numel: int, chunked: bool) -> tuple[int, int]:
    """``(num_chunks, area_numel)`` for a matrix storage whose areas need ``area`` elements."""
    if not chunked or area == 0:
        return 1, _round_up(area, align_numel)
    chunk = max(1, bucket_numel // world_size)
    if bucket_numel >= MIN_CHUNK_NUMEL:
        chunk = max(chunk, MIN_CHUNK_NUMEL)
    num_chunks = max(1, -(-area // chunk))
    chunk = _round_up(-(-area // num_chunks), align_numel)
    return num_chunks, chunk * num_chunks


def _balanced_matrix_storage(
    index: int, group: int, dtype: str, members: Sequence[ParamInfo], world_size: int,
    align_numel: int, bucket_numel: int, chunked: bool,
) -> Storage:
    # Deal the matrices to N lists by Newton-Schulz cost, costliest first, each to
    # the list with the least cost so far (LPT, Graham 1969): cost balances as in
    # the whole layout; the cut below then evens the elements, moving only the
    # small matrices kept at the lists' ends between neighbours.
    lists: list[list[ParamInfo]] = [[] for _ in range(world_size)]
    fill = [0] * world_size
    for info, rank in _least_loaded(sorted(members, key=lambda i: (-_cost(i), -i.numel, i.index)), world_size):
        lists[rank].append(info)
        fill[rank] += info.numel
    total = sum(fill)
    order = _surplus_order(fill, total / world_size)
    num_chunks, area = _chunking(-(-total // world_size), world_size, bucket_numel, align_numel, chunked)
    sequence = _cheap_boundaries([info for rank in order for info in _small_ends(lists[rank])], area, world_size)
    slots, offset = [], 0
    for info in sequence:
        slots.append(Span(info.index, offset, info.numel))
        offset += info.numel
    storage = Storage(index, group, Granularity.MATRIX, dtype, tuple(slots), area, world_size, num_chunks)
    owners = _straddler_owners(storage, {info.index: _cost(info) for info in members})
    return Storage(index, group, Granularity.MATRIX, dtype, tuple(slots), area, world_size, num_chunks,
                   tuple(owners), reduce_per_matrix=world_size > 1)


def _least_loaded(ordered: Sequence[ParamInfo], world_size: int) -> list[tuple[ParamInfo, int]]:
    """Each matrix, in ``ordered`` order, with the rank of least (cost, elements, rank) so far.

    A heap keyed exactly as that minimum (ties break on the rank), so the result
    is the plain scan's in O(M log N) instead of O(M N): at thousands of ranks
    the scan dominated planning.
    """
    heap = [(0, 0, rank) for rank in range(world_size)]
    out = []
    for info in ordered:
        load, fill, rank = heapq.heappop(heap)
        out.append((info, rank))
        heapq.heappush(heap, (load + _cost(info), fill + info.numel, rank))
    return out


def _surplus_order(fill: list[int], target: float) -> list[int]:
    """Ranks in the order that keeps the running surplus of elements nearest zero.

    Each step takes the rank minimising ``(|surplus + fill[r] - target|, r)``, so
    the areas cut from the sequence start close to where their lists do. The
    nearest fills sit on either side of ``target - surplus`` in a sorted list;
    within equal fills the lowest rank comes first. O(N log N) searches.
    """
    left = sorted((value, rank) for rank, value in enumerate(fill))
    order: list[int] = []
    surplus = 0.0
    while left:
        at = bisect.bisect_left(left, (target - surplus, -1))
        candidates = []
        for index in (at - 1, at):
            if 0 <= index < len(left):
                # The lowest rank among this fill value: the first entry of its run.
                first = bisect.bisect_left(left, (left[index][0], -1))
                candidates.append(first)
        best = min(candidates, key=lambda i: (abs(surplus + left[i][0] - target), left[i][1]))
        value, rank = left.pop(best)
        order.append(rank)
        surplus += value - target
    return order


def _cheap_boundaries(sequence: list[ParamInfo], area: int, world_size: int) -> list[ParamInfo]:
    """Reorder ``sequence`` locally so the cheapest nearby matrix crosses each area boundary.

    A straddler's Newton-Schulz cost lands on one member, which then does the
    work of the parts lying in the other members' areas: that moved cost
    unbalances it. For each boundary, any matrix lying wholly between the
    neighbouring boundaries may move into the crossing position (moves stay
    inside that span, so no other boundary changes); the crossing that moves
    the least cost (cost times the share outside its largest part) wins, the
    original order on ties.
    """
    sequence = list(sequence)
    window = 4
    for boundary in range(1, world_size):
        cut = boundary * area
        offsets = list(itertools.accumulate((info.numel for info in sequence), initial=0))
        crossing = next((i for i in range(len(sequence)) if offsets[i] < cut < offsets[i + 1]), None)
        if crossing is None:
            continue
        low_cut, high_cut = cut - area, cut + area
        best, best_cost = sequence, _moved_cost(sequence[crossing], cut - offsets[crossing])
        for j in range(max(0, crossing - window), min(len(sequence), crossing + window + 1)):
            if j == crossing or offsets[j] < low_cut or offsets[j + 1] > high_cut:
                continue
            trial = list(sequence)
            trial.insert(crossing, trial.pop(j))
            position = offsets[min(j, crossing)]
            for info in trial[min(j, crossing):]:
                if position < cut < position + info.numel:
                    moved = _moved_cost(info, cut - position)
                    if moved < best_cost:
                        best, best_cost = trial, moved
                    break
                position += info.numel
                if position > cut:
                    break
        sequence = best
    return sequence


def _small_ends(members: list[ParamInfo]) -> list[ParamInfo]:
    """``members`` with the smallest at both ends and the largest in the middle.

    Area boundaries fall near the ends of the dealt lists, and what crosses one
    moves between ranks: small matrices there keep straddlers and drift cheap.
    """
    ordered = sorted(members, key=lambda info: (info.numel, _cost(info), info.index))
    return ordered[0::2] + ordered[1::2][::-1]


def _moved_cost(info: ParamInfo, before_cut: int) -> float:
    """Newton-Schulz cost of ``info`` outside its larger part when cut ``before_cut`` elements in."""
    return _cost(info) * min(before_cut, info.numel - before_cut) / info.numel


def _straddler_owners(storage: Storage, cost: dict[int, int]) -> list[int]:
    """Newton-Schulz owner of every matrix of a balanced storage.

    A matrix inside one area is that rank's. The straddlers link consecutive
    ranks into a chain, and the owners minimise the busiest rank's cost on it:
    a binary search on that cost, each probe placing every straddler, in chain
    order, on its first member (left to right) with room for it; on a chain of
    two-member straddlers this first-fit is exact (giving the left rank what
    fits leaves the right one the most room).
    """
    base = [0] * storage.world_size
    owners, straddling = [], []
    for position, slot in enumerate(storage.slots):
        ranks = storage.members(position)
        owners.append(ranks[0])
        if len(ranks) == 1:
            base[ranks[0]] += cost[slot.param]
        else:
            straddling.append((position, ranks, cost[slot.param]))
    if not straddling:
        return owners

    def place(limit: int) -> list[int] | None:
        load, chosen = list(base), []
        for _, ranks, work in straddling:
            fits = [r for r in ranks if load[r] + work <= limit]
            if not fits:
                return None
            load[fits[0]] += work
            chosen.append(fits[0])
        return chosen

    low = max(max(base), max(work for _, _, work in straddling))
    high = max(base) + sum(work for _, _, work in straddling)
    while low < high:
        middle = (low + high) // 2
        if place(middle) is None:
            low = middle + 1
        else:
            high = middle
    for (position, _, _), rank in zip(straddling, place(low) or []):
        owners[position] = rank
    return owners


def _whole_matrix_storage(
    index: int, group: int, dtype: str, members: Sequence[ParamInfo], world_size: int,
    align_numel: int, bucket_numel: int, chunked: bool,
) -> Storage:
    # Longest-processing-time-first (Graham 1969) on Newton-Schulz cost;
    # deterministic, since ties break on the rank number.
    load, fill = [0] * world_size, [0] * world_size
    owner_of: dict[int, int] = {}
    for info, rank in _least_loaded(sorted(members, key=lambda i: (-_cost(i), i.index)), world_size):
        owner_of[info.index] = rank
        load[rank] += _cost(info)
        fill[rank] += info.numel
    num_chunks, area = _chunking(max(fill), world_size, bucket_numel, align_numel, chunked)
    cursor = [rank * area for rank in range(world_size)]
    placed = []
    for info in members:
        rank = owner_of[info.index]
        placed.append((cursor[rank], info, rank))
        cursor[rank] += info.numel
    placed.sort(key=lambda item: item[0])
    slots = tuple(Span(info.index, offset, info.numel) for offset, info, _ in placed)
    owners = tuple(rank for _, _, rank in placed)
    return Storage(index, group, Granularity.MATRIX, dtype, slots, area, world_size, num_chunks, owners,
                   reduce_per_matrix=world_size > 1)


def plan_shards(
    params: Sequence[ParamInfo],
    world_size: int,
    *,
    bucket_numel: int = DEFAULT_BUCKET_NUMEL,
    align_numel: int = DEFAULT_ALIGN_NUMEL,
    matrix_layout: str = "balanced",
    shard_gradients: bool = True,
) -> ShardPlan:
    """Place ``params`` in storages and cut them into ``world_size`` equal areas.

    Storages never mix param groups, dtypes or granularities. Elementwise
    storages hold at most ``bucket_numel`` elements unless one parameter alone is
    larger; a matrix group is one storage. On several ranks a matrix storage
    reduces gradients matrix by matrix as they arrive (stage 2: to the ranks
    holding each part; stage 1: all-reduced in place); with ``shard_gradients``
    (stage 2) it all-gathers in buckets of about ``bucket_numel`` elements,
    without (stage 1, where ``p.grad`` views the full gradient) in one. Buckets are
    ordered by when backward completes them: the bucket whose earliest-registered
    parameter comes last is complete first.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size!r} (expected an int >= 1)")
    if bucket_numel < 1:
        raise ValueError(f"Invalid bucket_numel: {bucket_numel} (expected an int >= 1)")
    if align_numel < 1:
        raise ValueError(f"Invalid align_numel: {align_numel} (expected an int >= 1)")
    if matrix_layout not in MATRIX_LAYOUTS:
        raise ValueError(f"Invalid matrix_layout: {matrix_layout!r} (expected one of {MATRIX_LAYOUTS})")
    for info in params:
        if info.granularity is Granularity.MATRIX and (
            isinstance(info.transform_cost, bool) or not isinstance(info.transform_cost, int)
            or info.transform_cost < 0
        ):
            raise ValueError(
                f"Invalid params: {info.describe()} is a matrix parameter with transform_cost="
                f"{info.transform_cost!r} (expected an int >= 0: its rule's MatrixRule.transform_cost, which the "
                "matrix layouts balance over ranks)"
            )
    open_units: dict[tuple[int, str, Granularity], list[ParamInfo]] = {}
    closed: list[tuple[tuple[int, str, Granularity], list[ParamInfo]]] = []
    for info in sorted(params, key=lambda i: -i.index):
        key = (info.group, info.dtype, info.granularity)
        members = open_units.setdefault(key, [])
        if (
            members
            and info.granularity is Granularity.ELEMENTWISE
            and sum(m.numel for m in members) + info.numel > bucket_numel
        ):
            closed.append((key, members))
            members = open_units[key] = []
        members.append(info)
    closed.extend((key, members) for key, members in open_units.items() if members)
    closed.sort(key=lambda item: -min(m.index for m in item[1]))
    storages = []
    for index, ((group, dtype, granularity), members) in enumerate(closed):
        if granularity is Granularity.MATRIX:
            build = _balanced_matrix_storage if matrix_layout == "balanced" else _whole_matrix_storage
            storages.append(build(index, group, dtype, members, world_size, align_numel, bucket_numel,
                                  shard_gradients))
        else:
            storages.append(_elementwise_storage(index, group, dtype, members, world_size, align_numel))
    buckets = _order_buckets(storages)
    plan = ShardPlan(world_size, tuple(params), tuple(storages), buckets, bucket_numel, align_numel, matrix_layout)
    plan.validate()
    return plan


def _order_buckets(storages: Sequence[Storage]) -> tuple[Bucket, ...]:
    """Buckets in the order backward completes them (the last-arriving parameter decides).

    Chunked storages reduce their gradients per matrix (:func:`shardopt.zero.schedule.reduce_units`);
    their buckets only all-gather, after the step, in chunk order.
    """
    keyed = []
    for storage in storages:
        if storage.num_chunks == 1:
            last = min((slot.param for slot in storage.slots), default=0)
            keyed.append((-last, storage.index, 0, storage))
        else:
            last = min((slot.param for slot in storage.slots), default=0)
            keyed.extend((-last, storage.index, k, storage) for k in range(storage.num_chunks))
    keyed.sort(key=lambda item: item[:3])
    return tuple(Bucket(position, storage, chunk) for position, (_, _, chunk, storage) in enumerate(keyed))
