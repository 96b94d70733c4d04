"""Tests for shardopt.schedules: hand-computed values, composition, the torch
adapter, and the validation table. No process group, all in-process."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch

from shardopt.schedules import (
    LLM_RECIPE_PEAK_LR,
    SCHEDULES,
    as_lr_scheduler,
    build_schedule,
    constant,
    cosine_decay,
    join,
    linear_warmup,
    llm_recipe,
    multiply,
    step_decay,
    warmup_cosine,
    warmup_stable_decay,
)

approx = pytest.approx


def values(schedule, steps):
    return [schedule(t) for t in steps]


# --- hand-computed values -------------------------------------------------------


def test_constant():
    assert values(constant(), [0, 1, 10**9]) == [1.0, 1.0, 1.0]
    assert constant(0.25)(7) == 0.25
    assert isinstance(constant(1)(0), float)


def test_linear_warmup():
    s = linear_warmup(100)
    assert values(s, [0, 1, 25, 50, 99, 100, 101, 10**6]) == approx(
        [0.0, 0.01, 0.25, 0.5, 0.99, 1.0, 1.0, 1.0]
    )
    assert s(100) == 1.0  # exactly the peak at the end of warmup
    # start = 0.2: 0.2 + 0.8 * t / 10
    assert values(linear_warmup(10, start=0.2), [0, 5, 10]) == approx([0.2, 0.6, 1.0])
    # warmup_steps == 0 means no warmup
    assert values(linear_warmup(0), [0, 1, 5]) == [1.0, 1.0, 1.0]


def test_cosine_decay():
    s = cosine_decay(100, min_ratio=0.1)
    assert s(0) == 1.0
    # quarter: 0.1 + 0.45 * (1 + cos(pi/4)) = 0.1 + 0.45 * (1 + sqrt(2)/2)
    assert s(25) == approx(0.1 + 0.45 * (1 + math.sqrt(2) / 2))
    assert s(50) == approx(0.55)  # halfway = min + 0.5 * (1 - min)
    assert s(75) == approx(0.1 + 0.45 * (1 - math.sqrt(2) / 2))
    assert s(100) == approx(0.1)
    assert values(s, [101, 1000]) == [0.1, 0.1]  # clamped after the end
    assert cosine_decay(10, min_ratio=0.0)(5) == approx(0.5)
    assert values(cosine_decay(10, min_ratio=1.0), [0, 5, 10, 20]) == approx([1.0] * 4)


def test_step_decay():
    s = step_decay(10, gamma=0.1)
    assert values(s, [0, 9, 10, 19, 20, 30]) == approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.001])
    h = step_decay(3, gamma=0.5)
    assert values(h, [2, 3, 5, 6]) == approx([1.0, 0.5, 0.5, 0.25])
    assert values(step_decay(1, gamma=1.0), [0, 1, 100]) == [1.0, 1.0, 1.0]


def test_warmup_cosine_boundaries():
    s = warmup_cosine(10, 110, min_ratio=0.1)
    assert s(0) == 0.0
    assert s(5) == approx(0.5)
    assert s(10) == 1.0  # end of warmup: peak
    # one step after warmup: progress 1/100 into the cosine
    assert s(11) == approx(0.1 + 0.45 * (1 + math.cos(math.pi / 100)))
    assert s(11) < 1.0
    assert s(60) == approx(0.55)  # halfway through the decay
    assert s(110) == approx(0.1)  # end of training = min_ratio
    assert values(s, [111, 10**6]) == approx([0.1, 0.1])  # clamped


def test_warmup_cosine_matches_chapter_formula():
    # Chapter 13.1 + 13.2 written out directly, with eta_max = 1.
    warmup, total, r = 7, 50, 0.2

    def chapter(t):
        if t <= warmup:
            return t / warmup
        if t > total:
            return r
        progress = (t - warmup) / (total - warmup)
        return r + 0.5 * (1 - r) * (1 + math.cos(progress * math.pi))

    s = warmup_cosine(warmup, total, min_ratio=r)
    for t in range(0, 60):
        assert s(t) == approx(chapter(t), abs=1e-15), t


def test_warmup_cosine_without_warmup():
    s = warmup_cosine(0, 100, min_ratio=0.0)
    assert s(0) == 1.0
    assert s(50) == approx(0.5)
    assert s(100) == approx(0.0)


def test_llm_recipe_chapter_values():
    assert LLM_RECIPE_PEAK_LR == 6e-4
    s = llm_recipe(total_steps=100_000)
    assert s(0) == 0.0
    assert s(1000) == approx(0.5)
    assert s(2000) == 1.0
    assert s(51_000) == approx(0.55)  # midpoint of the cosine from 2,000 to 100,000
    assert s(100_000) == approx(0.1)
    assert s(200_000) == approx(0.1)
    assert s(1000) * LLM_RECIPE_PEAK_LR == approx(3e-4)


@pytest.mark.parametrize(
    ("decay", "quarter", "half"),
    [
        # f(p) at p = 1/4 and p = 1/2; multiplier = 0.1 + 0.9 * f(p)
        ("linear", 0.75, 0.5),
        ("cosine", 0.5 * (1 + math.sqrt(2) / 2), 0.5),
        ("sqrt", 0.5, 1 - math.sqrt(0.5)),
    ],
)
def test_warmup_stable_decay_phase_edges(decay, quarter, half):
    # warmup [0, 10], stable [10, 90], decay [90, 110], then min_ratio
    s = warmup_stable_decay(10, 80, 20, min_ratio=0.1, decay=decay)
    assert s(0) == 0.0
    assert s(5) == approx(0.5)
    assert s(10) == 1.0  # end of warmup
    assert s(11) == 1.0  # one step into the stable phase
    assert s(90) == 1.0  # end of the stable phase
    assert s(91) < 1.0  # one step into the decay
    assert s(95) == approx(0.1 + 0.9 * quarter)
    assert s(100) == approx(0.1 + 0.9 * half)
    assert s(110) == approx(0.1)  # end of decay
    assert values(s, [111, 10**6]) == approx([0.1, 0.1])


def test_warmup_stable_decay_defaults_and_degenerate_phases():
    s = warmup_stable_decay(0, 0, 4)  # min_ratio 0, linear, no warmup or stable phase
    assert values(s, [0, 1, 2, 3, 4, 5]) == approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    s = warmup_stable_decay(4, 0, 1)
    assert values(s, [0, 2, 4, 5, 6]) == approx([0.0, 0.5, 1.0, 0.0, 0.0])


# --- composition and purity -------------------------------------------------------


def test_join_calls_each_piece_with_the_relative_step():
    seen = []

    def probe(t):
        seen.append(t)
        return float(t)

    s = join([constant(0.5), probe, constant(2.0)], [5, 15])
    assert values(s, [0, 4]) == [0.5, 0.5]
    assert values(s, [5, 10, 14]) == [0.0, 5.0, 9.0]
    assert seen == [0, 5, 9]  # relative to the piece's start at 5
    assert values(s, [15, 100]) == [2.0, 2.0]


def test_join_edges():
    assert values(join([constant(0.3)], []), [0, 9]) == [0.3, 0.3]
    # a boundary at 0 makes the first piece unreachable
    assert join([constant(3.0), constant(1.0)], [0])(0) == 1.0
    s = join([linear_warmup(10), cosine_decay(100, min_ratio=0.1)], [10])
    w = warmup_cosine(10, 110, min_ratio=0.1)
    assert values(s, range(130)) == values(w, range(130))


def test_multiply():
    s = multiply(linear_warmup(10), step_decay(5, gamma=0.5))
    assert values(s, [0, 4, 5, 10, 15]) == approx([0.0, 0.4, 0.25, 0.25, 0.125])
    assert multiply(constant(0.5))(3) == 0.5
    assert multiply(constant(2.0), constant(3.0), constant(0.5))(0) == 3.0


ALL_SCHEDULES = {
    "constant": constant(0.7),
    "linear_warmup": linear_warmup(13, start=0.1),
    "cosine_decay": cosine_decay(40),
    "step_decay": step_decay(7, gamma=0.5),
    "warmup_cosine": warmup_cosine(5, 50),
    "wsd_linear": warmup_stable_decay(5, 10, 20),
    "wsd_cosine": warmup_stable_decay(5, 10, 20, decay="cosine", min_ratio=0.1),
    "wsd_sqrt": warmup_stable_decay(5, 10, 20, decay="sqrt"),
    "llm_recipe": llm_recipe(60, warmup_steps=6),
    "join": join([linear_warmup(3), step_decay(4)], [3]),
    "multiply": multiply(linear_warmup(4), cosine_decay(30)),
}


@pytest.mark.parametrize("name", sorted(ALL_SCHEDULES))
def test_schedules_are_pure(name):
    s = ALL_SCHEDULES[name]
    steps = list(range(80))
    forward = values(s, steps)
    shuffled = steps[:]
    random.Random(0).shuffle(shuffled)
    out_of_order = dict(zip(shuffled, values(s, shuffled), strict=True))
    assert [out_of_order[t] for t in steps] == forward
    assert values(s, steps) == forward  # calling again changes nothing
    assert all(isinstance(v, float) and math.isfinite(v) for v in forward)


@pytest.mark.parametrize("name", sorted(ALL_SCHEDULES))
def test_schedules_reject_bad_steps(name):
    s = ALL_SCHEDULES[name]
    with pytest.raises(ValueError, match=re.escape("Invalid step: -1 (expected an int >= 0)")):
        s(-1)
    with pytest.raises(TypeError, match="Invalid step"):
        s(1.5)
    with pytest.raises(TypeError, match="Invalid step"):
        s(True)


# --- torch adapter -----------------------------------------------------------------


def make_sgd(lrs=(0.1, 0.02)):
    torch.manual_seed(0)
    groups = [{"params": [torch.nn.Parameter(torch.randn(3))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=1.0, momentum=0.9)


def train_step(optimizer):
    optimizer.zero_grad()
    loss = sum((p**2).sum() for g in optimizer.param_groups for p in g["params"])
    loss.backward()
    optimizer.step()


def test_as_lr_scheduler_drives_sgd():
    schedule = warmup_cosine(3, 10, min_ratio=0.1)
    opt = make_sgd()
    sched = as_lr_scheduler(opt, schedule)
    for step in range(14):
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs == approx([0.1 * schedule(step), 0.02 * schedule(step)]), step
        assert sched.get_last_lr() == approx(lrs)
        train_step(opt)
        sched.step()
    assert [g["initial_lr"] for g in opt.param_groups] == [0.1, 0.02]


def test_as_lr_scheduler_works_with_adamw():
    param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([param], lr=LLM_RECIPE_PEAK_LR)
    sched = as_lr_scheduler(opt, linear_warmup(4))
    for _ in range(2):
        train_step(opt)
        sched.step()
    assert opt.param_groups[0]["lr"] == approx(LLM_RECIPE_PEAK_LR * 0.5)


def test_as_lr_scheduler_state_dict_round_trip():
    schedule = warmup_stable_decay(2, 3, 5, min_ratio=0.1, decay="cosine")
    opt = make_sgd()
    sched = as_lr_scheduler(opt, schedule)
    for _ in range(4):
        train_step(opt)
        sched.step()
    opt_state, sched_state = opt.state_dict(), sched.state_dict()
    assert sched_state["last_epoch"] == 4

    # resume: fresh optimizer and scheduler, then load both state dicts
    opt2 = make_sgd()
    sched2 = as_lr_scheduler(opt2, schedule)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    for step in range(5, 13):
        for o, s in ((opt, sched), (opt2, sched2)):
            train_step(o)
            s.step()
        lrs = [g["lr"] for g in opt.param_groups]
        assert [g["lr"] for g in opt2.param_groups] == lrs
        assert lrs == approx([0.1 * schedule(step), 0.02 * schedule(step)])


def test_as_lr_scheduler_last_epoch():
    schedule = linear_warmup(10)
    opt = make_sgd()
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    as_lr_scheduler(opt, schedule, last_epoch=4)  # resumes at step 5
    assert [g["lr"] for g in opt.param_groups] == approx([0.05, 0.01])


# --- registry ---------------------------------------------------------------------

BUILD_CASES = {
    "constant": ({"value": 0.5}, constant(0.5)),
    "linear_warmup": ({"warmup_steps": 10}, linear_warmup(10)),
    "cosine_decay": ({"decay_steps": 20, "min_ratio": 0.0}, cosine_decay(20, min_ratio=0.0)),
    "step_decay": ({"step_size": 5, "gamma": 0.5}, step_decay(5, gamma=0.5)),
    "warmup_cosine": ({"warmup_steps": 5, "total_steps": 30}, warmup_cosine(5, 30)),
    "warmup_stable_decay": (
        {"warmup_steps": 2, "stable_steps": 5, "decay_steps": 10, "decay": "sqrt"},
        warmup_stable_decay(2, 5, 10, decay="sqrt"),
    ),
    "llm_recipe": ({"total_steps": 3000}, llm_recipe(3000)),
}


def test_registry_names():
    assert set(SCHEDULES) == set(BUILD_CASES)


@pytest.mark.parametrize("name", sorted(BUILD_CASES))
def test_build_schedule(name):
    kwargs, expected = BUILD_CASES[name]
    steps = [0, 1, 2, 5, 7, 15, 17, 20, 1000, 2000, 2500, 3000, 5000]
    assert values(build_schedule(name, **kwargs), steps) == values(expected, steps)


def test_build_schedule_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="Invalid schedule name: 'cosine'") as info:
        build_schedule("cosine", decay_steps=10)
    for name in SCHEDULES:
        assert repr(name) in str(info.value)
    with pytest.raises(TypeError, match="Invalid schedule name"):
        build_schedule(None)


def test_build_schedule_passes_validation_through():
    with pytest.raises(ValueError, match="Invalid decay_steps: 0"):
        build_schedule("cosine_decay", decay_steps=0)


# --- validation table -----------------------------------------------------------

BAD_INPUTS = [
    # (factory, args, kwargs, exception, message pattern)
    (constant, (), {"value": -1.0}, ValueError, "Invalid value: -1.0"),
    (constant, (), {"value": math.inf}, ValueError, "Invalid value: inf"),
    (constant, (), {"value": "1"}, TypeError, "Invalid value: '1'"),
    (linear_warmup, (-1,), {}, ValueError, r"Invalid warmup_steps: -1 \(expected an int >= 0\)"),
    (linear_warmup, (1.5,), {}, TypeError, "Invalid warmup_steps: 1.5"),
    (linear_warmup, (True,), {}, TypeError, "Invalid warmup_steps: True"),
    (linear_warmup, (10,), {"start": 1.5}, ValueError, "Invalid start: 1.5"),
    (linear_warmup, (10,), {"start": math.nan}, ValueError, "Invalid start: nan"),
    (cosine_decay, (0,), {}, ValueError, r"Invalid decay_steps: 0 \(expected an int >= 1\)"),
    (cosine_decay, (None,), {}, TypeError, "Invalid decay_steps: None"),
    (cosine_decay, (10,), {"min_ratio": -0.1}, ValueError, r"Invalid min_ratio: -0.1"),
    (cosine_decay, (10,), {"min_ratio": 1.1}, ValueError, r"Invalid min_ratio: 1.1"),
    (cosine_decay, (10,), {"min_ratio": math.nan}, ValueError, "Invalid min_ratio: nan"),
    (cosine_decay, (10,), {"min_ratio": math.inf}, ValueError, "Invalid min_ratio: inf"),
    (cosine_decay, (10,), {"min_ratio": "0.1"}, TypeError, "Invalid min_ratio: '0.1'"),
    (step_decay, (0,), {}, ValueError, "Invalid step_size: 0"),
    (step_decay, (10,), {"gamma": 0.0}, ValueError, r"Invalid gamma: 0.0 .*\(0, 1\]"),
    (step_decay, (10,), {"gamma": 1.5}, ValueError, "Invalid gamma: 1.5"),
    (step_decay, (10,), {"gamma": -math.inf}, ValueError, "Invalid gamma: -inf"),
    (step_decay, (10,), {"gamma": None}, TypeError, "Invalid gamma: None"),
    (warmup_cosine, (-1, 10), {}, ValueError, "Invalid warmup_steps: -1"),
    (warmup_cosine, (10, 10), {}, ValueError, r"Invalid total_steps: 10 .*warmup_steps"),
    (warmup_cosine, (10, 5), {}, ValueError, "Invalid total_steps: 5"),
    (warmup_cosine, (10, 20.0), {}, TypeError, "Invalid total_steps: 20.0"),
    (warmup_cosine, (10, 20), {"min_ratio": 2}, ValueError, "Invalid min_ratio: 2"),
    (warmup_stable_decay, (-1, 0, 1), {}, ValueError, "Invalid warmup_steps: -1"),
    (warmup_stable_decay, (0, -1, 1), {}, ValueError, "Invalid stable_steps: -1"),
    (warmup_stable_decay, (0, 0, 0), {}, ValueError, "Invalid decay_steps: 0"),
    (warmup_stable_decay, (0, 0, 1), {"min_ratio": -1}, ValueError, "Invalid min_ratio: -1"),
    (warmup_stable_decay, (0, 0, 1), {"decay": "exp"}, ValueError, "Invalid decay: 'exp'"),
    (warmup_stable_decay, (0, 0, 1), {"decay": None}, TypeError, "Invalid decay: None"),
    (llm_recipe, (2000,), {}, ValueError, r"Invalid total_steps: 2000 .*warmup_steps = 2000"),
    (llm_recipe, (1000,), {}, ValueError, "Invalid total_steps: 1000"),
    (llm_recipe, (100,), {"warmup_steps": 10, "min_ratio": 1.5}, ValueError, "min_ratio"),
    (join, ([],), {"boundaries": []}, ValueError, "Invalid schedules"),
    (join, ([constant(), 3],), {"boundaries": [1]}, TypeError, r"Invalid schedules\[1\]"),
    (join, ([constant(), constant()],), {"boundaries": []}, ValueError, "Invalid boundaries"),
    (join, ([constant()] * 3,), {"boundaries": [5, 5]}, ValueError, "Invalid boundaries"),
    (join, ([constant()] * 2,), {"boundaries": [-1]}, ValueError, r"Invalid boundaries\[0\]"),
    (join, ([constant()] * 2,), {"boundaries": [2.5]}, TypeError, r"Invalid boundaries\[0\]"),
    (multiply, (), {}, ValueError, "Invalid schedules"),
    (multiply, (constant(), 0.5), {}, TypeError, r"Invalid schedules\[1\]"),
    (as_lr_scheduler, (object(), constant()), {}, TypeError, "Invalid optimizer"),
    (as_lr_scheduler, (make_sgd(), 0.5), {}, TypeError, "Invalid schedule"),
    (as_lr_scheduler, (make_sgd(), constant()), {"last_epoch": -2}, ValueError, "last_epoch"),
]


@pytest.mark.parametrize(
    ("factory", "args", "kwargs", "exc", "pattern"),
    BAD_INPUTS,
    ids=[f"{case[0].__name__}-{i}" for i, case in enumerate(BAD_INPUTS)],
)
def test_bad_inputs(factory, args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        factory(*args, **kwargs)


def test_bool_errors_are_type_errors_not_value_errors():
    # bool is an int subclass; the message must still name the argument
    with pytest.raises(TypeError, match=r"Invalid step_size: True \(expected an int, got bool\)"):
        step_decay(True)
