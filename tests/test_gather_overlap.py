"""``ZeroOptimizer(overlap_gather=True)``: the parameter all-gathers of ``step()`` left in flight
and waited for by the next forward (:mod:`shardopt.zero.gather`) give the same bits as waiting
in ``step()``. One spawn per world size runs every program (``gather_workers.suite``)."""

from __future__ import annotations

import copy
import functools
import gc
from types import SimpleNamespace

import gather_workers as g
import pytest
import torch
import zero_workers as w
from dist_harness import run_ranks

import shardopt
from shardopt.zero.gather import ParamGather
from shardopt.zero.layout import plan_shards
from shardopt.zero.plan import ParamInfo
from shardopt.zero.schedule import forward_order

CASES = [f"{kind}/stage{stage}" for kind in ("adamw", "muon") for stage in (1, 2)]
WORLD_CASES = [(2, case) for case in CASES] + [(3, case) for case in CASES if case.endswith("stage2")]
ENTRY_POINTS = ["state_dict", "load_state_dict", "full_state_dict", "wait_for_params", "close"]


@functools.cache
def results(world_size: int) -> list[dict]:
    return run_ranks(g.suite, world_size, timeout=120)


@pytest.mark.parametrize(("world_size", "case"), WORLD_CASES)
def test_overlapped_gathers_train_bitwise_like_waited_ones(world_size, case):
    for rank, out in enumerate(results(world_size)):
        run = out[case]
        where = f"rank {rank}, {case}"
        assert run["losses_equal"], where  # every forward saw the new parameters
        assert all(n > 0 for n in run["pending_after_step"]), (where, run["pending_after_step"])
        assert set(run["pending_off"]) == {0}, where
        # The forward waited for all of them and the global pre-hook is gone.
        assert set(run["pending_after_forward"]) == {0}, (where, run["pending_after_forward"])
        assert set(run["hooks_after_forward"]) == {0}, where
        assert run["wait_for_params"]["params_equal"], where
        assert run["close"]["params_equal"], where


@pytest.mark.parametrize(("world_size", "case"), WORLD_CASES)
def test_entry_points_wait_for_pending_gathers(world_size, case):
    for rank, out in enumerate(results(world_size)):
        run = out[case]
        for name in ENTRY_POINTS:
            call = run[name]
            assert call["pending_before"] > 0, (rank, case, name)
            assert (call["pending_after"], call["hooks_after"]) == (0, 0), (rank, case, name, call)
        assert run["state_dict"]["equal"], (rank, case)
        assert run["full_state_dict"]["equal"], (rank, case)


@pytest.mark.parametrize("world_size", [2, 3])
def test_default_configuration_repeats_bitwise_and_waits_layer_by_layer(world_size):
    for rank, out in enumerate(results(world_size)):
        run = out["default_config"]
        assert run["buckets"] == 4, run
        assert run["rerun_equal"], (rank, run)
        assert run["equal_to_off"], (rank, run)
        # Two layers per bucket, launched in forward order: each layer waits for its own.
        assert run["pending_by_layer"] == [4, 3, 3, 2, 2, 1, 1, 0, 0], (rank, run["pending_by_layer"])


def test_on_one_rank_the_option_changes_nothing():
    torch.manual_seed(0)
    model = w.TinyLM()
    ref = copy.deepcopy(model)
    hooks = g.num_global_pre_hooks()
    opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, overlap_gather=True, **w.HP)
    ref_opt = shardopt.ZeroOptimizer(ref.parameters(), shardopt.AdamW, **w.HP)
    for step in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            w.lm_loss(m, w.batch(step)).backward()
            o.step()
            o.zero_grad()
        assert opt.param_gather.num_pending == 0
        assert g.num_global_pre_hooks() == hooks
    assert g.same_params(model, ref)
    opt.close()
    ref_opt.close()


def test_overlap_gather_must_be_a_bool():
    with pytest.raises(TypeError, match="Invalid overlap_gather: 'yes'"):
        shardopt.ZeroOptimizer(w.TinyLM().parameters(), shardopt.AdamW, overlap_gather="yes", lr=1e-3)


def test_forward_order_is_backward_order_reversed_chunks_first_to_last():
    infos = [ParamInfo(i, f"p{i}", (40 + i,), "float32", 0) for i in range(12)]
    plan = plan_shards(infos, 2, bucket_numel=100)
    assert len(plan.buckets) >= 4
    assert forward_order(plan) == list(reversed(plan.buckets))


# ---------------------------------------------------------------- the hook's logic, in process


class _Handle:
    def __init__(self, waited: list[int], index: int) -> None:
        self.waited, self.index = waited, index

    def wait(self) -> bool:
        self.waited.append(self.index)
        return True


class _FakeComm:
    """Two ranks as far as ParamGather can tell: every all-gather returns a handle that logs its wait."""

    active, rank = True, 0

    def __init__(self) -> None:
        self.launched: list[_Handle] = []
        self.waited: list[int] = []

    def _handle(self) -> _Handle:
        self.launched.append(_Handle(self.waited, len(self.launched)))
        return self.launched[-1]

    def all_gather_inplace(self, flat, *, async_op):
        return self._handle()

    def all_gather_chunks(self, outputs, local, *, async_op):
        return self._handle()


def _gather_over(model: torch.nn.Module, bucket_numel: int, overlap: bool = True):
    params = dict(enumerate(model.parameters()))
    infos = [ParamInfo(i, str(i), tuple(p.shape), "float32", 0) for i, p in params.items()]
    plan = plan_shards(infos, 2, bucket_numel=bucket_numel)
    buffers = [SimpleNamespace(bucket=b, owner=SimpleNamespace(param_flat=None), param_chunks=[None, None])
               for b in plan.buckets]
    comm = _FakeComm()
    return ParamGather(plan, buffers, params, comm, overlap=overlap), comm


def _four_layers() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(8, 8, bias=False) for _ in range(4)))  # a bucket each


def test_a_module_waits_for_the_buckets_of_its_direct_parameters_and_those_before():
    model, x = _four_layers(), torch.randn(2, 8)
    hooks = g.num_global_pre_hooks()
    gather, comm = _gather_over(model, bucket_numel=64)
    gather.launch()
    assert (gather.num_pending, g.num_global_pre_hooks()) == (4, hooks + 1)
    model[1](x)
    assert (comm.waited, gather.num_pending) == ([0, 1], 2)
    model[0](x)
    assert comm.waited == [0, 1]
    model(x)  # the container has no parameters of its own; its layers wait for the rest
    assert (comm.waited, gather.num_pending) == ([0, 1, 2, 3], 0)
    assert g.num_global_pre_hooks() == hooks  # nothing pending: no hook at all
    gather.launch()
    gather.wait_all()
    gather.wait_all()
    assert (comm.waited, g.num_global_pre_hooks()) == (list(range(8)), hooks)


def test_without_overlap_every_gather_is_waited_for_in_launch():
    gather, comm = _gather_over(_four_layers(), bucket_numel=64, overlap=False)
    hooks = g.num_global_pre_hooks()
    gather.launch()
    assert (comm.waited, gather.num_pending, g.num_global_pre_hooks()) == ([0, 1, 2, 3], 0, hooks)


def test_a_dropped_gather_removes_its_hook():
    model, x = _four_layers(), torch.randn(2, 8)
    hooks = g.num_global_pre_hooks()
    gather, _ = _gather_over(model, bucket_numel=64)
    gather.launch()
    del gather
    gc.collect()
    model(x)
    assert g.num_global_pre_hooks() == hooks


@pytest.mark.filterwarnings("ignore:Using `torch.compile.module.` when there are global hooks")
@pytest.mark.parametrize("in_place", [False, True])
def test_a_compiled_model_waits_before_its_graph_runs(in_place):
    model, x = _four_layers(), torch.randn(2, 8)
    gather, comm = _gather_over(model, bucket_numel=64)
    if in_place:
        model.compile(backend="eager")  # its modules' calls, and their hooks, run as before
        compiled = model
    else:
        compiled = torch.compile(model, backend="eager")  # the layers run inside the graph: no hook sees them
    compiled(x)
    gather.launch()
    compiled(x)
    assert (comm.waited, gather.num_pending) == ([0, 1, 2, 3], 0)
