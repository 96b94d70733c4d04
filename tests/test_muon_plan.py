"""Muon plans at scale, without processes: Llama-2-7B and -70B at 8, 64 and 512 ranks.

Shapes come from the models' public config.json files (shardopt.presets). The
hidden matrices (attention q/k/v/o, MLP gate/up/down) are Muon's; embeddings,
the output head and norms go to AdamW, as ``muon_param_groups`` splits them.
"""

from __future__ import annotations

import functools

import pytest
from plan_infos import param_info

from shardopt import Granularity, ParamInfo, plan_shards
from shardopt.planner import presets
from shardopt.zero.plan import DEFAULT_BUCKET_NUMEL
from shardopt.zero.schedule import window_numel


@functools.cache
def llama_infos(name: str) -> tuple[ParamInfo, ...]:
    arch, _ = presets.resolve(name)
    out = []
    for index, (param, shape) in enumerate(presets.param_shapes(arch)):
        hidden = len(shape) == 2 and "embed" not in param and "lm_head" not in param
        out.append(param_info(index, param, tuple(shape), "bfloat16", 0 if hidden else 1,
                              Granularity.MATRIX if hidden else Granularity.ELEMENTWISE))
    return tuple(out)


@functools.cache
def plan_for(name: str, world_size: int, layout: str = "balanced"):
    return plan_shards(llama_infos(name), world_size, matrix_layout=layout)


def test_the_shapes_are_the_public_configs():
    assert sum(i.numel for i in llama_infos("llama2-7b")) == 6_738_415_616
    assert sum(i.numel for i in llama_infos("llama2-70b")) == 68_976_648_192
    assert sum(i.granularity is Granularity.MATRIX for i in llama_infos("llama2-7b")) == 32 * 7
    assert sum(i.granularity is Granularity.MATRIX for i in llama_infos("llama2-70b")) == 80 * 7


CASES = [(name, n) for name in ("llama2-7b", "llama2-70b") for n in (8, 64, 512)]


@pytest.mark.parametrize(("name", "world_size"), CASES)
def test_balanced_plan_pads_little_and_balances_state_and_newton_schulz(name, world_size):
    plan = plan_for(name, world_size)
    balance = plan.matrix_balance()
    assert balance["padding_fraction"] <= 0.03
    assert balance["state_max_over_mean"] <= 1.10
    # Newton-Schulz runs once per matrix, on one rank: no rank can do less than
    # the costliest matrix. Where that matrix alone exceeds 1.10x the mean
    # share, the bound is its cost: Llama-2-7B at 512 ranks has 224 matrices
    # for 512 ranks (a 4096x11008 matrix is 3.28x the mean), Llama-2-70B at 512
    # ranks 560 matrices (an 8192x28672 one is 1.70x the mean).
    bound = max(1.10, balance["ns_lower_bound"])
    assert balance["ns_max_over_mean"] <= bound + 1e-9, plan.describe()
    if world_size < 512:
        assert balance["ns_lower_bound"] == 1.0
        assert balance["ns_max_over_mean"] <= 1.10
    else:
        assert balance["ns_lower_bound"] > 1.10


@pytest.mark.parametrize(("name", "world_size"), CASES)
def test_exchange_is_small_against_the_gradient_traffic(name, world_size):
    plan = plan_for(name, world_size)
    matrix = next(s for s in plan.storages if s.granularity is Granularity.MATRIX)
    # Per step a rank reduce-scatters and all-gathers ~(N-1)/N of the storage each.
    collective = 2 * matrix.flat_numel * (world_size - 1) / world_size
    worst = max(plan.exchange_numel(r) for r in range(world_size))
    assert worst <= 0.01 * collective, (worst, collective)


@pytest.mark.parametrize("world_size", [64, 512])
def test_whole_layout_pads_where_balanced_does_not(world_size):
    whole = plan_for("llama2-70b", world_size, "whole").matrix_balance()
    balanced = plan_for("llama2-70b", world_size).matrix_balance()
    assert whole["num_straddlers"] == 0
    assert balanced["state_max_over_mean"] <= whole["state_max_over_mean"]
    if world_size == 512:
        # An 8192x28672 matrix is 1.76x the mean share: whole matrices pad every area to it.
        assert whole["padding_fraction"] > 0.5
        assert whole["state_max_over_mean"] > 1.7


@pytest.mark.parametrize("world_size", [8, 64])
def test_matrix_buckets_stay_near_bucket_numel(world_size):
    # The storage is the whole Muon group (64 billion elements); its buckets are chunks.
    plan = plan_for("llama2-70b", world_size)
    matrix = [b for b in plan.buckets if b.granularity is Granularity.MATRIX]
    assert len(matrix) > 1000
    assert max(b.flat_numel for b in matrix) <= DEFAULT_BUCKET_NUMEL + world_size * plan.align_numel


def test_the_first_steps_reduction_order_holds_little_more_than_later_steps():
    # ZeroOptimizer numbers a Muon setup's parameters group by group (every matrix
    # before the embedding, whose gradient arrives last); the first step launches in
    # the plan's order, so that order must interleave the groups as backward does.
    from shardopt import planner

    arch, _ = presets.resolve("llama2-70b")
    named = [(name, tuple(shape), True) for name, shape in presets.param_shapes(arch)]
    infos, _ = planner.param_infos(named, "muon", "bfloat16")
    assert [i.group for i in infos] == sorted(i.group for i in infos)  # group-major numbering
    index = {info.name: info.index for info in infos}
    arrival = [index[name] for name in presets.backward_order([n for n, _, _ in named])]
    plan = plan_shards(infos, 64)
    first = window_numel(plan, arrival, first_step=True)
    steady = window_numel(plan, arrival)
    total = sum(info.numel for info in infos)
    assert first <= 2 * steady, (first, steady, total)
    assert first < 0.02 * total, (first, steady, total)


@pytest.mark.parametrize(("world_size", "shard_gradients"), [(8, False), (8, True), (1, False)])
def test_muon_matrices_are_reduced_one_by_one_as_they_arrive_at_both_stages(world_size, shard_gradients):
    # Stage 1 all-reduces each matrix in place as soon as its gradient arrives, like
    # stage 2's per-matrix reduces: not one bucket reduced after the last matrix.
    from shardopt.zero.schedule import BucketReduction, MatrixReduction, reduce_units

    plan = plan_shards(llama_infos("llama2-7b"), world_size, shard_gradients=shard_gradients)
    units = reduce_units(plan)
    matrices = sorted(i.index for i in plan.params if i.granularity is Granularity.MATRIX)
    per_matrix = sorted(u.param for u in units if isinstance(u, MatrixReduction))
    buckets = [plan.buckets[u.bucket] for u in units if isinstance(u, BucketReduction)]
    if world_size == 1:  # nothing to communicate: the storage's one bucket
        assert per_matrix == []
        assert any(b.storage.granularity is Granularity.MATRIX for b in buckets)
    else:
        assert per_matrix == matrices
        assert all(b.storage.granularity is Granularity.ELEMENTWISE for b in buckets)
