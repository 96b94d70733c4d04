"""MatrixRule.workspace_bytes, measured: the transient bytes a matrix rule's code allocates.

The memory planner adds ``rule.workspace_bytes(shapes, hp, master_dtype)`` to a
rank's bytes ("muon workspace"). Here the code it describes runs on CPU under
``torch.profiler`` with ``profile_memory=True``, which records every allocation
and free of torch's CPU allocator as a ``[memory]`` event with its signed size
(``nbytes()`` of the Kineto events: the size requested, which the CPU allocator
does not round). The running sum of those sizes in time order is the number of
bytes allocated beyond what existed before; its maximum is the peak. The
measurement is deterministic (each case runs twice) and ends at zero (nothing
transient survives the step), and the declared number equals it to the byte.

Two paths run the rule: ``MatrixStep`` inside a one-process ``ZeroOptimizer``
(the engine's loop, the very object ``step()`` calls) and ``MatrixRule.update``
(single-process ``shardopt.Muon``); both hold the same tensors at the same
moments.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import shardopt
from shardopt.planner import accounting
from shardopt.rules import MuonRule
from shardopt.rules.base import allocate_state

# Tall, wide and square matrices; same shapes (one batch in fp32 Newton-Schulz);
# 3-D expert stacks; a conv kernel (4 x 36); tall matrices of at least 60 x 60
# (torch's CPU copy of a transposed X goes through a 60 x 60 block buffer).
SHAPES = [(64, 32), (16, 16), (3, 8, 16), (100, 70), (16, 16), (4, 4, 3, 3), (64, 32), (32, 64), (100, 70),
          (2, 72, 60), (80, 60)]
PRECISIONS = {torch.float32: accounting.PRECISIONS["fp32"], torch.bfloat16: accounting.PRECISIONS["bf16"]}


def allocation_peak(fn) -> tuple[int, int]:
    """(peak, final) bytes of CPU tensors allocated beyond those alive before, while ``fn()`` runs."""
    # No cyclic garbage collection inside the window: it would free earlier tensors there.
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        gc.enable()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):  # stable: ties keep the recorded order
        running += event.nbytes()
        peak = max(peak, running)
    return peak, running


def measured(fn) -> int:
    first, second = allocation_peak(fn), allocation_peak(fn)
    assert first == second, (first, second)  # deterministic
    peak, final = first
    assert final == 0  # every transient freed
    return peak


def test_the_measurement_counts_every_byte_in_order():
    def fn():
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(500, dtype=torch.float64)  # + 4000
        del a
        c = torch.empty(3, 7, dtype=torch.bfloat16)  # + 42, after a's 4000 are back
        del b, c

    assert allocation_peak(fn) == (8000, 0)
    kept = []
    assert allocation_peak(lambda: kept.append(torch.empty(10))) == (40, 40)


def matrix_step(shapes, hp, dtype):
    """A one-process ZeroOptimizer(shardopt.Muon): its MatrixStep as a call, and the shapes in the step's order."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in shapes]
    opt = shardopt.ZeroOptimizer([{"params": params}], shardopt.Muon, stage=1,
                                 precision=shardopt.PrecisionPolicy(reduce_dtype=dtype, master_dtype=dtype), **hp)
    (buffers,) = opt.storages
    step = opt.matrix_steps[buffers.storage.index]
    opt.ensure_states(buffers)
    buffers.states["momentum_buffer"].normal_(generator=gen)
    grad = torch.randn(buffers.used_numel, generator=gen).to(dtype)
    group = opt.param_groups[0]
    return (lambda: step(opt.inner.muon_rule, group, grad)), [step.shape_of[p] for p in step.whole], group, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
def test_matrix_step_allocates_what_the_rule_and_the_planner_declare(ns_dtype, nesterov, dtype):
    hp = {"ns_dtype": ns_dtype, "nesterov": nesterov}
    run, order, group, opt = matrix_step(SHAPES, hp, dtype)
    try:
        peak = measured(run)
    finally:
        opt.close()
    assert sorted(order) == sorted(SHAPES)
    assert peak == opt.inner.muon_rule.workspace_bytes(order, group, dtype)
    # The planner: the same plan, the same order, the same number.
    named = [(f"layers.{i}.weight", shape, True) for i, shape in enumerate(SHAPES)]
    precision = PRECISIONS[dtype]
    infos, groups = accounting.param_infos(named, "muon", precision.param, hp)
    _, ranks = accounting.plan_rank_bytes(infos, groups, precision, 1, 1)
    assert ranks[0].buffers["muon workspace"] == peak


def single_process_update(rule, shapes, hp, dtype):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]
    grads = [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]
    states = [allocate_state(rule.state_specs(hp), p) for p in params]
    for state in states:
        state["momentum_buffer"].normal_(generator=gen)
    return lambda: rule.update(params, grads, states, hp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
def test_single_process_update_allocates_the_declared_workspace(ns_dtype, nesterov, dtype):
    rule = MuonRule()
    hp = {**rule.defaults, "ns_dtype": ns_dtype, "nesterov": nesterov}
    peak = measured(single_process_update(rule, SHAPES, hp, dtype))
    assert peak == rule.workspace_bytes(SHAPES, hp, dtype)


@pytest.mark.parametrize("shapes", [[(1, 1)], [(2, 1, 1)], [(1, 1), (5, 1)]], ids=str)
@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
def test_single_element_matrices_may_exceed_it_by_0d_temporaries(shapes, ns_dtype):
    # workspace_bytes leaves out 0-d temporaries: the norm of a 2-D input, the
    # Python floats torch wraps as 0-d tensors (8 bytes each, then one of the
    # operand's dtype). They are freed before Newton-Schulz's loop, whose X, Gram
    # matrix and polynomial outweigh them unless a matrix has a single element.
    rule = MuonRule()
    hp = {**rule.defaults, "ns_dtype": ns_dtype}
    for dtype in (torch.float32, torch.bfloat16):
        peak = measured(single_process_update(rule, shapes, hp, dtype))
        declared = rule.workspace_bytes(shapes, hp, dtype)
        assert declared <= peak <= declared + 16, (dtype, peak, declared)
