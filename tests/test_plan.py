"""Shard plans as pure data: invariants at world sizes 1-8, no process group."""

from __future__ import annotations

import dataclasses
import math
import random
from itertools import pairwise

import pytest
from plan_infos import param_info

from shardopt import Granularity, ParamInfo, plan_shards
from shardopt.zero.plan import PlanError
from shardopt.zero.schedule import MatrixReduction, reduce_units, unit_params


def infos(shapes, granularity=Granularity.ELEMENTWISE, group=0):
    return [param_info(i, f"p{i}", s, "float32", group, granularity) for i, s in enumerate(shapes)]


SHAPES = [(17, 12), (12,), (12,), (36, 12), (12, 12), (31, 12), (31,), (12, 31), (12,), (1,), (17, 12)]


@pytest.mark.parametrize("world_size", range(1, 9))
@pytest.mark.parametrize("bucket_numel", [1, 100, 300, 10_000])
def test_elementwise_plan_covers_every_element_once(world_size, bucket_numel):
    plan = plan_shards(infos(SHAPES), world_size, bucket_numel=bucket_numel)
    plan.validate()
    total = sum(math.prod(s) for s in SHAPES)
    assert plan.used_numel == total
    # Every element of every parameter is in exactly one rank's region.
    covered: dict[int, list[tuple[int, int]]] = {}
    for bucket in plan.buckets:
        assert bucket.flat_numel == bucket.region_numel * world_size
        assert bucket.region_numel % plan.align_numel == 0
        for rank in range(world_size):
            for piece in bucket.pieces(rank):
                covered.setdefault(piece.param, []).append((piece.param_offset, piece.numel))
    for index, shape in enumerate(SHAPES):
        spans = sorted(covered[index])
        cursor = 0
        for offset, numel in spans:
            assert offset == cursor
            cursor += numel
        assert cursor == math.prod(shape)
    # Padding is only what equal, aligned regions need.
    for bucket in plan.buckets:
        assert bucket.padding_numel < world_size * plan.align_numel


def test_buckets_respect_size_and_never_mix_groups_or_dtypes():
    params = infos(SHAPES[:5]) + [
        ParamInfo(5 + i, f"q{i}", s, "bfloat16", 1) for i, s in enumerate(SHAPES[5:])
    ]
    plan = plan_shards(params, 3, bucket_numel=200)
    for bucket in plan.buckets:
        members = [plan.param(slot.param) for slot in bucket.slots]
        assert len({(m.group, m.dtype) for m in members}) == 1
        assert bucket.used_numel <= 200 or len(members) == 1


def test_buckets_are_ordered_as_backward_completes_them():
    plan = plan_shards(infos(SHAPES), 2, bucket_numel=300)
    firsts = [min(slot.param for slot in bucket.slots) for bucket in plan.buckets]
    assert firsts == sorted(firsts, reverse=True)


def test_more_ranks_than_elements_gives_empty_regions():
    plan = plan_shards(infos([(1,), (2,)]), 8, bucket_numel=10)
    (bucket,) = plan.buckets
    assert bucket.used_numel == 3
    assert [len(bucket.pieces(r)) for r in range(8)] == [2] + [0] * 7
    assert plan.storages[0].used_area_numel(5) == 0


@pytest.mark.parametrize("world_size", range(1, 9))
def test_whole_matrix_layout_keeps_each_matrix_on_one_owner(world_size):
    rng = random.Random(world_size)
    shapes = [(rng.randint(2, 40), rng.randint(2, 40)) for _ in range(23)]
    plan = plan_shards(infos(shapes, Granularity.MATRIX), world_size, bucket_numel=2_000, matrix_layout="whole")
    plan.validate()
    assert not plan.straddlers
    (storage,) = plan.storages
    for position, slot in enumerate(storage.slots):
        (owner,) = storage.members(position)
        assert storage.ns_owners[position] == owner
        start, end = storage.area_bounds(owner)
        assert start <= slot.offset
        assert slot.offset + slot.numel <= end


@pytest.mark.parametrize("world_size", range(1, 9))
@pytest.mark.parametrize("bucket_numel", [50, 2_000, 1 << 20])
def test_balanced_matrix_layout_gives_equal_areas_and_buckets_cover_each_element_once(world_size, bucket_numel):
    rng = random.Random(world_size)
    shapes = [(rng.randint(2, 40), rng.randint(2, 40)) for _ in range(23)] + [(3, 5, 7)]
    plan = plan_shards(infos(shapes, Granularity.MATRIX), world_size, bucket_numel=bucket_numel)
    (storage,) = plan.storages
    total = sum(math.prod(s) for s in shapes)
    # Areas are equal: the padding is what alignment and chunking need.
    assert storage.area_numel == storage.num_chunks * storage.chunk_numel
    assert storage.padding_numel < world_size * storage.num_chunks * plan.align_numel + world_size
    assert plan.used_numel == total
    # Every element is in exactly one bucket slot; a bucket's region r is a chunk of area r.
    covered: dict[int, list[tuple[int, int]]] = {}
    for bucket in plan.buckets:
        for slot in bucket.slots:
            covered.setdefault(slot.param, []).append((slot.param_offset, slot.numel))
            rank = slot.offset // bucket.region_numel
            in_area = bucket.area_offset + slot.offset - rank * bucket.region_numel
            storage_offset = rank * storage.area_numel + in_area
            param_start = next(s.offset for s in storage.slots if s.param == slot.param)
            assert storage_offset == param_start + slot.param_offset
    for index, shape in enumerate(shapes):
        cursor = 0
        for offset, numel in sorted(covered[index]):
            assert offset == cursor
            cursor += numel
        assert cursor == math.prod(shape)
    # Straddlers cross area boundaries, are owned by a member, and the exchange is theirs.
    for straddler in plan.straddlers:
        assert len(straddler.members) > 1
        assert straddler.owner in straddler.members
        assert sum(straddler.parts) == plan.param(straddler.param).numel
    assert sum(plan.exchange_numel(r) for r in range(world_size)) == 2 * sum(
        sum(s.parts) - s.parts[s.members.index(s.owner)] for s in plan.straddlers)
    assert len(plan.straddlers) <= world_size - 1 or any(
        plan.param(s.param).numel > storage.area_numel for s in plan.straddlers)


@pytest.mark.parametrize("shard_gradients", [True, False])
def test_every_parameter_is_reduced_once_in_backward_order(shard_gradients):
    rng = random.Random(3)
    shapes = [(rng.randint(2, 40), rng.randint(2, 40)) for _ in range(23)]
    params = infos(shapes, Granularity.MATRIX) + [
        ParamInfo(23 + i, f"e{i}", s, "float32", 1) for i, s in enumerate(SHAPES)]
    plan = plan_shards(params, 4, bucket_numel=64, shard_gradients=shard_gradients)
    units = reduce_units(plan)
    reduced = [p for unit in units for p in unit_params(plan, unit)]
    assert sorted(reduced) == list(range(len(params)))
    # Launch order: by each unit's last-arriving parameter, measured by its place in its
    # own param group (groups are numbered one after the other, backward runs through all).
    depth = {}
    for group in {p.group for p in params}:
        members = sorted(p.index for p in params if p.group == group)
        depth.update({index: (place + 1) / len(members) for place, index in enumerate(members)})
    lasts = [min(depth[p] for p in unit_params(plan, unit)) for unit in units]
    assert lasts == sorted(lasts, reverse=True)
    matrix_units = [u for u in units if isinstance(u, MatrixReduction)]
    # Both stages reduce each matrix on its own as it arrives (stage 2: parts to their
    # ranks; stage 1: all-reduced in place); only stage 2 all-gathers in chunks.
    assert len(matrix_units) == 23
    (storage,) = [s for s in plan.storages if s.granularity is Granularity.MATRIX]
    assert storage.num_chunks > 1 if shard_gradients else storage.num_chunks == 1
    for unit in matrix_units:
        parts = storage.parts(unit.param)
        assert parts[0][1] == 0
        assert parts[-1][2] == plan.param(unit.param).numel
        assert all(a[2] == b[1] for a, b in pairwise(parts))


def test_plan_is_deterministic_and_fingerprinted():
    a = plan_shards(infos(SHAPES), 3, bucket_numel=300)
    b = plan_shards(infos(SHAPES), 3, bucket_numel=300)
    c = plan_shards(infos(SHAPES), 4, bucket_numel=300)
    assert a == b
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert "padding" in a.describe()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"world_size": 0}, "world_size"),
        ({"world_size": True}, "world_size"),
        ({"world_size": 2, "bucket_numel": 0}, "bucket_numel"),
        ({"world_size": 2, "align_numel": 0}, "align_numel"),
        ({"world_size": 2, "matrix_layout": "striped"}, "matrix_layout"),
    ],
)
def test_bad_plan_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_shards(infos(SHAPES), **kwargs)


def test_plan_validation_names_the_broken_invariant():
    infos = [ParamInfo(i, f"p{i}", (5, 7), "float32", 0) for i in range(3)]
    plan = plan_shards(infos, 2)
    storage = plan.storages[0]
    moved = dataclasses.replace(storage.slots[1], offset=3)
    overlapping = dataclasses.replace(storage, slots=(storage.slots[0], moved, *storage.slots[2:]))
    with pytest.raises(PlanError, match="storage 0: overlapping or unsorted slots at parameter"):
        dataclasses.replace(plan, storages=(overlapping, *plan.storages[1:])).validate()
    missing = dataclasses.replace(storage, slots=storage.slots[:-1])
    with pytest.raises(PlanError, match=r"parameters \[\d+\] are in no storage"):
        dataclasses.replace(plan, storages=(missing, *plan.storages[1:])).validate()
    with pytest.raises(PlanError, match="not a multiple of align_numel"):
        dataclasses.replace(plan, align_numel=7).validate()
