"""ZeroOptimizer on real gloo ranks (spawned processes) against the unsharded optimizer.

One spawn per world size runs every program of that world size (see
``zero_workers.suite``); the tests below assert on its results.
"""

from __future__ import annotations

import functools

import pytest
import zero_workers as w
from dist_harness import run_ranks

TOL = 1e-6
PROGRAMS = {
    1: ["equivalence", "muon"],
    2: ["equivalence", "features", "precision", "memory_and_comm", "checkpoints", "muon", "ddp_detect",
        "determinism", "fused"],
    3: ["equivalence", "features", "memory_and_comm", "checkpoints", "muon", "determinism", "fused"],
    4: ["equivalence", "memory_and_comm", "muon", "startup", "determinism"],
}



@functools.cache
def results(world_size: int) -> list[dict]:
    return run_ranks(w.suite, world_size, PROGRAMS[world_size], timeout=400)


def per_rank(world_size: int, program: str) -> list:
    return [out[program] for out in results(world_size)]


def test_worlds_three_and_four_share_out_every_rule():
    assert sorted(w.cases_for(3) + w.cases_for(4), key=w.CASES.index) == w.CASES


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_elementwise_rule_equals_unsharded(world_size):
    outs = per_rank(world_size, "equivalence")
    root = outs[0]
    cases = [f"{name}/stage{stage}" for name, *_ in w.cases_for(world_size) for stage in (1, 2)]
    for case in cases:
        assert root[case] <= TOL, f"{case}: max abs diff {root[case]:.3g} > {TOL}"
        for rank, out in enumerate(outs):
            assert out[f"{case}/digest"] == root[f"{case}/digest"], f"rank {rank} differs: {case}"


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_elementwise_rule_repeats_bitwise_in_fp32_and_bf16(world_size):
    outs = per_rank(world_size, "determinism")
    root = outs[0]
    for name, *_ in w.cases_for(world_size):
        for stage in (1, 2):
            for dtype in ("float32", "bfloat16"):
                key = f"{name}/stage{stage}/{dtype}"
                assert root[f"{key}/buckets"] >= 3, key  # several reductions in flight
                if stage == 2 or world_size <= 2:
                    # The oracle gets the rank-ordered mean of the same gradients (and, for
                    # bf16, fp32 master weights rounded into the model): equal bit for bit.
                    assert root[key] == 0.0, f"{key}: {root[key]:.3g} from the unsharded optimizer"
                else:
                    # Stage 1 all-reduces with gloo's ring, which sums each chunk starting
                    # at another rank: last-bit differences (measured 1.5e-8), at most one
                    # ulp once rounded to bf16.
                    assert root[f"{key}/beyond_ulp"] <= 1e-6, f"{key}: {root[key]:.3g} from the oracle"
                for rank, out in enumerate(outs):
                    assert out[f"{key}/rerun"] == 0.0, f"rank {rank}: {key} differs between two runs"
                    assert out[f"{key}/digest"] == root[f"{key}/digest"], f"rank {rank} differs: {key}"


@pytest.mark.parametrize("world_size", [2, 3])
def test_clip_skip_accumulate_unused_stage1_grads(world_size):
    outs = per_rank(world_size, "features")
    for rank, out in enumerate(outs):
        assert out["clip"] <= TOL, (rank, out["clip"])
        assert out["clip_norm_rel"] <= 1e-5
        assert out["skip"] <= TOL, (rank, out["skip"])
        assert out["num_skipped"] == 1
        assert out["skip_state_untouched"] is True
        assert out["no_sync/stage1"] <= TOL, out
        assert out["no_sync/stage2"] <= TOL, out
        assert out["unused_on_some_ranks"] <= TOL
        assert out["stage1_grad"] <= TOL
    # Identical on every rank, not merely close to the reference.
    assert all(out["params_digest"] == outs[0]["params_digest"] for out in outs)


def test_bf16_params_with_fp32_master_track_fp32():
    for out in per_rank(2, "precision"):
        # bf16 keeps 8 bits of mantissa: parameters of size ~1 round at ~4e-3, and
        # the forward/backward in bf16 perturbs gradients by ~1%. After 20 AdamW
        # steps of lr 0.01 the bf16 model stays within 3e-2 of the fp32 one.
        assert out["bf16_params/reduce_float32"] <= 3e-2
        assert out["bf16_params/reduce_bfloat16"] <= 3e-2
        assert out["master_bytes/reduce_float32"] > 0


@pytest.mark.parametrize("world_size", [2, 3])
def test_fused_kernels_on_the_areas_equal_torch_fused(world_size):
    # The same kernels; the sharded gradient is a mean of rank slices and a parameter
    # cut by an area boundary meets the kernels' scalar tail elsewhere: last bits.
    for out in per_rank(world_size, "fused"):
        bad = {case: diff for case, diff in out.items() if not diff <= TOL}
        assert not bad, bad
        assert set(out) == {f"{n}/stage{s}" for n in ("adamw", "sgd_momentum") for s in (1, 2)}


@pytest.mark.parametrize("world_size", [2, 3])
def test_buffer_pool_stops_allocating_after_two_steps(world_size):
    # The first step launches in the plan's order, the second in the order the first
    # completed; from then on every step borrows the same buffers back.
    for rank, out in enumerate(per_rank(world_size, "memory_and_comm")):
        for name in ("adamw", "muon"):
            counts = out["pool"][name]
            assert counts[0] > 0, (name, rank, counts)
            assert counts[1] == counts[-1], (name, rank, counts)
            grads, casts, staging, lent = out["pool"][f"{name}/held"]
            assert grads > 0, (name, rank, out["pool"][f"{name}/held"])
            assert casts > 0, (name, rank, out["pool"][f"{name}/held"])
            assert staging > 0, (name, rank, out["pool"][f"{name}/held"])
            assert lent == 0, (name, rank, out["pool"][f"{name}/held"])
            assert out["pool"][f"{name}/after_close"] == [0, 0], (name, rank)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_state_bytes_and_comm_bytes_are_ideal(world_size):
    outs = per_rank(world_size, "memory_and_comm")
    model_numel = outs[0]["model_numel"]
    flat_numel = outs[0]["flat_numel"]
    # Every element of state exists on exactly one rank: the shards add up exactly.
    assert sum(out["state_param_numel"] for out in outs) == model_numel
    padding = flat_numel - model_numel
    for out in outs:
        assert out["state_param_numel"] <= model_numel / world_size + padding / world_size
        per_step = out["per_step"]
        share = (world_size - 1) / world_size
        ideal = share * model_numel * 4  # fp32 bytes, each collective
        bound = share * flat_numel * 4  # what the padded buckets must move
        assert ideal <= per_step["reduce_scatter"] <= bound
        assert ideal <= per_step["all_gather"] <= bound
        # The only other traffic: one all-reduce of two float64 per step.
        assert per_step["all_reduce"] == pytest.approx(2 * share * 16, abs=1)
        assert {k for k, v in per_step.items() if v} == {"reduce_scatter", "all_gather", "all_reduce"}


@pytest.mark.parametrize("world_size", [2, 3])
def test_checkpoints_match_torch_and_reshard(world_size):
    outs = per_rank(world_size, "checkpoints")
    assert outs[0]["full_vs_torch"] <= TOL
    assert outs[0]["same_keys"] == 1.0
    for out in outs[1:]:
        assert out["non_root_gets_none"] == 1.0
    for out in outs:
        assert out["sharded_mismatch_raises"] == 1.0
        assert out["resharded"] <= TOL
        assert out["from_torch"] <= TOL
        assert out["continued"] <= TOL


def test_ranks_with_different_parameters_raise_instead_of_hanging():
    for out in run_ranks(w.mismatch, 2, timeout=60):
        for kind in ("extra", "shape"):
            assert "ranks hold different parameters" in out[kind], (kind, out[kind])
            assert "first mismatch" in out[kind]
        assert "Invalid stage: ranks disagree (rank 0: 2, rank 1: 1)" in out["stage"]
        assert "Invalid param_groups[0]['lr']: ranks disagree (rank 0: 0.01, rank 1: 0.02)" in out["lr"]
        assert "Invalid param_groups[0]['amsgrad']: ranks disagree (rank 0: False, rank 1: True)" in out["amsgrad"]
        assert "Invalid max_grad_norm: ranks disagree (rank 0: 1.0, rank 1: 2.0)" in out["max_grad_norm"]
        assert "Invalid optimizer_class: ranks disagree (rank 0: 'AdamW', rank 1: 'Adam')" in out["class"]
        assert "Invalid reduce_dtype: ranks disagree (rank 0: torch.float32, rank 1: torch.bfloat16)" in out[
            "reduce_dtype"]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_muon_owner_ranks_equal_single_process(world_size):
    outs = per_rank(world_size, "muon")
    for out in outs:
        assert out["diff"] <= 1e-5
    # qkv, proj, up and down weights; embed and lm_head are AdamW's by name.
    num_matrices = 4
    totals = [sum(out["orthogonalized_per_step"][s] for out in outs) for s in range(3)]
    assert totals == [num_matrices] * 3


def test_ddp_wrapped_model_is_refused():
    for message in per_rank(2, "ddp_detect"):
        assert "DistributedDataParallel" in message, message
        assert "module.parameters()" in message, message


def test_construction_broadcasts_rank0_and_empty_regions_work():
    outs = per_rank(4, "startup")
    for rank, out in enumerate(outs):
        assert out["broadcast_equals_rank0_init"] is True
        assert out["tiny"] <= TOL
        assert out["empty_region"] is (rank > 0)
