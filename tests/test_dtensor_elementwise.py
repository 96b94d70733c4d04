"""shardopt's elementwise optimizers on FSDP2 and FSDP2 x TP DTensor parameters.

Every rule (SGD with momentum, dampening and Nesterov; Adagrad; RMSprop, centered
with momentum; Adam, with AMSGrad; AdamW, with AMSGrad; Lion) trains 20 steps on
FSDP2 at two ranks and on a 2 x 2 mesh (FSDP2 over dp, column/row-wise TP over tp)
and must equal the single-process optimizer on the full batch, with no
collective inside ``step()``; the gradients are clipped by their global norm with
``shardopt.dtensor.clip_grad_norm_``, one all-reduce per mesh. One spawn per world
size runs every rule (``dtensor_workers``: one model branch per rule).
"""

from __future__ import annotations

import functools

import dtensor_workers as w
import pytest
from dist_harness import run_ranks

# fp32. The sharded run sums each gradient over ranks where the oracle sums over the
# batch in one process, so the two differ in the last bits, and 20 steps of adaptive
# rules carry them on. Measured after 20 steps: parameters <= 7.2e-7 (centered
# RMSprop; the others <= 4.2e-7), absolute, the parameters being O(1); states
# relative to their largest element <= 1.4e-6 (centered RMSprop's momentum buffer, a
# sum of g / sqrt(v - mean(g)^2) over the steps, ~10 in size; the others <= 8.3e-7).
TOL = 1e-6
STATE_RTOL = 1e-5
NORM_RTOL = 1e-6
CASES = {"fsdp": 2, "fsdp_tp": 4}
MESHES = {"fsdp": 1, "fsdp_tp": 2}  # the dp mesh; the 2-D mesh and the LayerNorms' dp sub-mesh


@functools.cache
def results(case: str) -> list[dict]:
    return run_ranks(w.suite, CASES[case], "fsdp" if case == "fsdp" else "2d", timeout=240)


@pytest.mark.parametrize("case", CASES)
def test_every_rule_equals_the_single_process_optimizer(case):
    for rank, out in enumerate(results(case)):
        assert set(out["diffs"]) == set(w.RULES)
        bad = {name: d for name, d in out["diffs"].items() if not d <= TOL}
        assert not bad, (rank, bad)
        bad = {name: d for name, d in out["state_diffs"].items() if not d <= STATE_RTOL}
        assert not bad, (rank, bad)


@pytest.mark.parametrize("case", CASES)
def test_states_keep_the_parameters_layout(case):
    # DTensor states with the parameter's mesh and placements: DCP saves them as the parameter.
    for out in results(case):
        assert out["layout_errors"] == []


def test_placements_covered():
    assert "Shard(dim=0)" in results("fsdp")[0]["placements"]
    seen = " ".join(p for out in results("fsdp_tp") for p in out["placements"])
    for placement in ("_StridedShard(dim=0", "Shard(dim=1)", "Shard(dim=0)", "Replicate()"):
        assert placement in seen, (placement, seen)


@pytest.mark.parametrize("case", CASES)
def test_no_collective_in_step(case):
    for out in results(case):
        assert out["step_comms"] == 0


@pytest.mark.parametrize("case", CASES)
def test_clip_by_the_global_norm(case):
    for out in results(case):
        assert out["clipped_steps"] >= w.STEPS // 2  # the clip did scale the gradients
        assert out["norm_rel_diff"] <= NORM_RTOL
        for counts in out["clip_comms"]:
            # One all-reduce per mesh; at step 0 the infinity norm is taken first as well.
            assert counts == [2 * MESHES[case]] + [MESHES[case]] * (len(w.COUNTED_STEPS) - 1)


def test_the_same_run_twice_is_bitwise_identical():
    # The second run cuts the local shards into pieces (shardopt's CPU chunking).
    for out in results("fsdp"):
        assert len(out["digests"]) == 2
        assert out["digests"][0] == out["digests"][1]
        assert out["norms_equal"]


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, float("inf")])
def test_grad_norm_of_plain_tensors_is_torchs(norm_type):
    # No DTensor, no process group: the local arithmetic alone, empty tensors included.
    import torch

    from shardopt.dtensor import clip_grad_norm_

    def params():
        g = torch.Generator().manual_seed(0)
        out = [torch.zeros(5, 3, requires_grad=True), torch.zeros(0, requires_grad=True),
               torch.zeros(7, requires_grad=True)]
        for p in out:
            p.grad = torch.randn(p.shape, generator=g)
        return out

    ours, theirs = params(), params()
    norm = clip_grad_norm_(ours, 0.5, norm_type)
    # torch refuses the infinity norm of an empty tensor (no identity for max); it adds nothing.
    expected = torch.nn.utils.clip_grad_norm_([p for p in theirs if p.numel()], 0.5, norm_type)
    assert torch.allclose(norm, expected, rtol=1e-6, atol=0)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=0)


def test_grad_norm_refuses_a_non_positive_order():
    import torch

    from shardopt.dtensor import grad_norm

    with pytest.raises(ValueError, match="norm_type"):
        grad_norm([torch.ones(2)], 0)
