"""The planner's stage 3 against a real FSDP2 run: ``fully_shard`` at 2 ranks, dp 2 x tp 2 at 4.

One spawned job per world size runs every scenario (``planner_fsdp_workers``);
the planner is given the same model as a ``config.json`` dict (Megatron splits
for tp) and must give, per data-parallel rank:

* parameters, gradients and every optimizer state: equal to the bytes measured,
  exactly (AdamW and Muon with its AdamW group, fp32 and bf16 mixed precision);
* each FSDP2 transient row (unsharded parameters, all-gather buffers, unsharded
  gradients, reduce-scatter buffers): equal to the measured peak of that buffer;
* their sum: at least the measured joint peak, and above it by at most the
  all-gather and reduce-scatter rows, the stated tolerance: the rows peak at
  different moments (two groups' all-gathers in forward, one reduce-scatter
  in backward), which the planner does not sequence.

The planner models the busiest tensor-parallel rank (the vocabulary split
rounds up): tp rank 0 here, equal; tp rank 1 holds no more.
"""

from __future__ import annotations

import functools

import planner_fsdp_workers as w
import pytest
import torch
from dist_harness import run_ranks

from shardopt import planner
from shardopt.planner import fsdp, presets


@functools.cache
def measured(tp: int) -> list[dict]:
    return run_ranks(w.all_scenarios, 2 * tp, tp, timeout=240)


def _planned(tp: int, optimizer: str, precision: str) -> planner.MemoryReport:
    return planner.estimate(w.CONFIG, optimizer=optimizer, precision=precision, zero_stage=3, dp=2, tp=tp)


@pytest.mark.parametrize("tp", [1, 2], ids=["fsdp2-2ranks", "fsdp2xtp-2x2"])
def test_stage3_equals_a_real_fully_shard_run(tp):
    for rank_out in measured(tp):
        for label, optimizer, precision in w.SCENARIOS:
            got = rank_out[label]
            planned = _planned(tp, optimizer, precision).ranks[rank_out["dp_rank"]]
            where = f"{label}, tp={tp}, dp rank {rank_out['dp_rank']}, tp rank {rank_out['tp_rank']}"
            rows = {k: planned.buffers[k] for k in w.CATEGORIES}
            planned_states = (planned.params, planned.grads, dict(planned.optimizer_states))
            got_states = (got["params"], got["grads"], got["optimizer_states"])
            got_rows = {k: got["transients"][k] for k in w.CATEGORIES}
            if rank_out["tp_rank"] == 0:
                assert got_states == planned_states, where
                assert got_rows == rows, where
            else:
                assert got["params"] <= planned.params, where
                assert got["grads"] <= planned.grads, where
                assert all(got["optimizer_states"][k] <= v for k, v in planned.optimizer_states.items()), where
                assert all(got_rows[k] <= v for k, v in rows.items()), where
            assert planned.master_params == 0, where  # the fp32 shards are the optimizer's parameters
            joint = got["transients"]["sum"]
            slack = rows["fsdp all-gather"] + rows["fsdp reduce-scatter"]
            assert joint <= sum(rows.values()) <= joint + slack, where
    if tp == 2:
        placements = set(measured(tp)[0]["adamw/fp32"]["placements"])
        assert {"Shard(dim=0)", "Shard(dim=1)"} <= placements, placements
        assert any(p.startswith("_StridedShard") for p in placements), placements


def test_padding_shows_in_params_not_in_states():
    # Vocabulary 23 over 2 ranks: both store 12 rows (FSDP2 pre-pads), rank 1's states cover 11.
    r = _planned(1, "adamw", "fp32")
    assert r.ranks[0].params == r.ranks[1].params
    assert r.ranks[0].optimizer_states["exp_avg"] - r.ranks[1].optimizer_states["exp_avg"] == 2 * w.HIDDEN * 4
    assert fsdp.padded_shard_numel((23, 12), 2) == 12 * 12
    assert [fsdp.local_numel((5, 3), 4, r) for r in range(4)] == [6, 6, 3, 0]


def test_a_module_plans_like_its_config():
    with torch.device("meta"):
        module = w.TinyLlama()
    names = [n for n, _ in module.named_parameters()]
    arch = presets.from_config(w.CONFIG)
    assert [(n, tuple(p.shape)) for n, p in module.named_parameters()] == presets.param_shapes(arch)
    kwargs = dict(optimizer="muon", precision="mixed", zero_stage=3, dp=2)
    from_module = planner.estimate(module, fsdp_units=w.UNITS, grad_arrival=presets.backward_order(names), **kwargs)
    assert from_module.ranks == _planned(1, "muon", "mixed").ranks
    # fully_shard(model) alone: one group, the whole model gathered at once.
    alone = planner.estimate(module, **kwargs).rank.buffers["fsdp unsharded params"]
    assert alone == 2 * sum(fsdp.padded_shard_numel(tuple(p.shape), 2) for p in module.parameters()) * 2
