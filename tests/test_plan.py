"""Shard plans as pure data: invariants at world sizes 1-8, no process group."""

from __future__ import annotations

import math
import random

import pytest

from shardopt import Granularity, ParamInfo, plan_shards


def infos(shapes, granularity=Granularity.ELEMENTWISE, group=0):
    return [ParamInfo(i, f"p{i}", s, "float32", group, granularity) for i, s in enumerate(shapes)]


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
    assert bucket.used_region_numel(5) == 0


@pytest.mark.parametrize("world_size", range(1, 9))
def test_matrix_plan_keeps_each_matrix_whole_on_one_owner(world_size):
    rng = random.Random(world_size)
    shapes = [(rng.randint(2, 40), rng.randint(2, 40)) for _ in range(23)]
    plan = plan_shards(infos(shapes, Granularity.MATRIX), world_size, bucket_numel=2_000)
    plan.validate()
    for bucket in plan.buckets:
        for slot, owner in zip(bucket.slots, bucket.owners):
            pieces = [p for r in range(world_size) for p in bucket.pieces(r) if p.param == slot.param]
            assert len(pieces) == 1 and pieces[0].numel == slot.numel
            start, end = bucket.region_bounds(owner)
            assert start <= slot.offset < end


def test_plan_is_deterministic_and_fingerprinted():
    a = plan_shards(infos(SHAPES), 3, bucket_numel=300)
    b = plan_shards(infos(SHAPES), 3, bucket_numel=300)
    c = plan_shards(infos(SHAPES), 4, bucket_numel=300)
    assert a == b and a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert "padding" in a.describe()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"world_size": 0}, "world_size"),
        ({"world_size": True}, "world_size"),
        ({"world_size": 2, "bucket_numel": 0}, "bucket_numel"),
        ({"world_size": 2, "align_numel": 0}, "align_numel"),
    ],
)
def test_bad_plan_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_shards(infos(SHAPES), **kwargs)
