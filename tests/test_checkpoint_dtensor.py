"""shardopt's optimizers on FSDP2 DTensor parameters checkpointed with ``shardopt.checkpoint``:
resume in new processes, reshard to one process, and move to and from ZeroOptimizer.

The format is the one ZeroOptimizer's checkpoints use (torch's FSDP2 +
torch.optim layout, keyed by parameter name, plus the ``"shardopt"``
integrity record), so the same files serve both paths.
"""

from __future__ import annotations

import functools

import checkpoint_dtensor_workers as w
import pytest
import torch
from checkpoint_workers import results
from dist_harness import run_ranks
from zero_workers import TinyLM

import shardopt
from shardopt import checkpoint

WORLD = 2
# Resharding: the gradient of the full batch on one process against the average of
# two halves, and (ZeroOptimizer <-> FSDP2) another reduction order: last bits.
TOL = 1e-6


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt-dtensor")


@pytest.fixture(scope="module")
def runs(root) -> dict:
    saved = results(run_ranks(w.save_runs, WORLD, str(root), timeout=180)[0])
    resumed = results(run_ranks(w.resume_runs, WORLD, str(root), timeout=180)[0])
    return {"saved": saved, "resumed": resumed}


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("kind", w.KINDS)
def test_resume_in_new_processes_is_bitwise(runs, kind):
    assert runs["resumed"][f"{kind}/steps"] == [float(w.N)]
    for saved, resumed in zip(runs["saved"][kind], runs["resumed"][kind]):
        assert torch.equal(saved, resumed), kind


def test_moves_between_fsdp2_and_zero_optimizer_both_ways(runs):
    assert _max_diff(runs["saved"]["adamw"], runs["resumed"]["adamw->zero"]) <= TOL
    assert _max_diff(runs["saved"]["zero"], runs["resumed"]["zero->adamw"]) <= TOL


@pytest.mark.parametrize("kind", w.KINDS)
def test_reshards_to_one_process(runs, root, kind):
    """The 2-rank FSDP2 checkpoint into a plain model and optimizer in this process."""
    torch.manual_seed(123)
    model = TinyLM()
    opt = w.optimizer_for(kind, model)
    checkpoint.load(w.state_of(model, opt), checkpoint.latest(root / kind))
    w.train(model, opt, range(w.N, 2 * w.N), 0, 1)
    assert _max_diff(runs["saved"][kind], w.full_params(model)) <= TOL


def test_another_rule_is_refused_naming_it(runs, root):
    torch.manual_seed(0)
    model = TinyLM()
    opt = shardopt.Lion(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="saved by rule 'adamw', this optimizer runs 'lion'"):
        checkpoint.load(w.state_of(model, opt), checkpoint.latest(root / "adamw"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@functools.cache
def _single_state() -> dict:
    torch.manual_seed(0)
    model = TinyLM()
    opt = shardopt.AdamW(model.parameters(), lr=0.01)
    return checkpoint.get_optimizer_state_dict(model, opt)


def test_get_allocates_state_without_a_step():
    """torch's function would run a step with zero gradients on an empty optimizer."""
    state = _single_state()
    steps = {float(entry["step"]) for entry in state["state"].values()}
    assert steps == {0.0}
    assert checkpoint.read_meta(state)["rules"] == ["adamw"]
