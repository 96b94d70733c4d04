"""Each shardopt optimizer against its torch.optim counterpart, in one process.

Both optimizers get identical parameters and identical gradients (set on
``p.grad`` from a seeded generator), so any difference comes from the update
math. The elementwise rules follow torch.optim's single-tensor operation order
(the path torch.optim takes on CPU), so the results are bitwise equal; Muon
with bfloat16 Newton-Schulz runs the same ``addmm`` sequence as
``torch.optim.Muon``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import shardopt

NUM_STEPS = 60
# 1-element, odd-sized 1-D, 2-D, 3-D and square parameters.
SHAPES = [(1,), (7,), (5, 3), (2, 3, 5), (4, 4)]
# Muon updates matrices only; every shape here is distinct.
MATRIX_SHAPES = [(8, 5), (5, 8), (6, 6), (16, 4), (1, 9)]
# Several matrices of the same shape in one group, as in a transformer
# (q/k/v/o projections): shardopt batches these through one bmm.
SAME_SHAPE_MATRICES = [(16, 16)] * 4 + [(12, 8)] * 3 + [(8, 5)]


def make_params(shapes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(shape, generator=gen, dtype=dtype) for shape in shapes]
    ours = [t.clone().requires_grad_() for t in init]
    theirs = [t.clone().requires_grad_() for t in init]
    return ours, theirs


def feed_same_grads(gen, *param_lists):
    for group in zip(*param_lists, strict=True):
        grad = torch.randn(group[0].shape, generator=gen, dtype=group[0].dtype)
        for param in group:
            param.grad = grad.clone()


def run_side_by_side(ours_opt, theirs_opt, ours, theirs, num_steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(num_steps):
        feed_same_grads(gen, ours, theirs)
        ours_opt.step()
        theirs_opt.step()


def assert_params_equal(ours, theirs):
    max_diff = max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))
    assert max_diff <= 1e-6, max_diff
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b), (a - b).abs().max().item()


CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.05, momentum=0.8, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05, maximize=True)),
    ("SGD", dict(lr=0.05, weight_decay=0.1, maximize=True)),
    ("Adagrad", dict(lr=0.1)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01)),
    ("Adagrad", dict(lr=0.1, initial_accumulator_value=0.5)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.02, initial_accumulator_value=0.1, weight_decay=0.1)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, centered=True)),
    ("RMSprop", dict(lr=0.01, momentum=0.9)),
    ("RMSprop", dict(lr=0.01, centered=True, momentum=0.9)),
    ("RMSprop", dict(lr=0.01, alpha=0.9, weight_decay=0.1)),
    ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5, weight_decay=0.1, maximize=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, amsgrad=True, weight_decay=0.3, maximize=True)),
]
CASE_IDS = [f"{name}-{kwargs}" for name, kwargs in CASES]


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_matches_torch_optim(name, kwargs):
    ours, theirs = make_params(SHAPES)
    ours_opt = getattr(shardopt, name)(ours, **kwargs)
    theirs_opt = getattr(torch.optim, name)(theirs, **kwargs)
    run_side_by_side(ours_opt, theirs_opt, ours, theirs, NUM_STEPS)
    assert_params_equal(ours, theirs)
    # The states agree too, under torch's names.
    for a, b in zip(ours, theirs, strict=True):
        for key, value in theirs_opt.state[b].items():
            assert torch.equal(ours_opt.state[a][key], value), key


def test_matches_torch_optim_in_float64():
    ours, theirs = make_params(SHAPES, dtype=torch.float64)
    ours_opt = shardopt.Adam(ours, lr=0.01, amsgrad=True, weight_decay=0.1)
    theirs_opt = torch.optim.Adam(theirs, lr=0.01, amsgrad=True, weight_decay=0.1)
    run_side_by_side(ours_opt, theirs_opt, ours, theirs, NUM_STEPS)
    assert_params_equal(ours, theirs)


def test_parameters_without_grad_are_skipped_like_torch():
    ours, theirs = make_params(SHAPES)
    ours_opt = shardopt.Adam(ours, lr=0.01)
    theirs_opt = torch.optim.Adam(theirs, lr=0.01)
    gen = torch.Generator().manual_seed(3)
    for step in range(20):
        feed_same_grads(gen, ours, theirs)
        # Drop the gradient of one parameter on alternate steps.
        ours[step % 2].grad = None
        theirs[step % 2].grad = None
        ours_opt.step()
        theirs_opt.step()
    assert_params_equal(ours, theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(ours_opt.state[a]["step"], theirs_opt.state[b]["step"])


# ---------------------------------------------------------------------------
# state_dict compatibility in both directions

STATE_DICT_CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
    ("RMSprop", dict(lr=0.01, centered=True, momentum=0.9)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
]
STATE_DICT_IDS = [f"{name}-{kwargs}" for name, kwargs in STATE_DICT_CASES]


def _continue_after_load(first_cls, second_cls, kwargs):
    """Train ``first_cls`` a while, load its state into ``second_cls`` and
    check that both continue identically."""
    params, _ = make_params(SHAPES)
    first = first_cls(params, **kwargs)
    gen = torch.Generator().manual_seed(5)
    for _ in range(10):
        feed_same_grads(gen, params)
        first.step()
    copies = [p.detach().clone().requires_grad_() for p in params]
    second = second_cls(copies, **kwargs)
    # torch's load_state_dict keeps the given tensors (no copy), as after
    # torch.load; copy so the two optimizers do not share buffers.
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    run_side_by_side(first, second, params, copies, 20, seed=6)
    assert_params_equal(params, copies)
    return first, second, params, copies


@pytest.mark.parametrize(("name", "kwargs"), STATE_DICT_CASES, ids=STATE_DICT_IDS)
def test_state_dict_shardopt_to_torch(name, kwargs):
    _continue_after_load(getattr(shardopt, name), getattr(torch.optim, name), kwargs)


@pytest.mark.parametrize(("name", "kwargs"), STATE_DICT_CASES, ids=STATE_DICT_IDS)
def test_state_dict_torch_to_shardopt(name, kwargs):
    _continue_after_load(getattr(torch.optim, name), getattr(shardopt, name), kwargs)


@pytest.mark.parametrize(("name", "kwargs"), STATE_DICT_CASES, ids=STATE_DICT_IDS)
def test_state_names_equal_torch(name, kwargs):
    ours, theirs = make_params(SHAPES)
    ours_opt = getattr(shardopt, name)(ours, **kwargs)
    theirs_opt = getattr(torch.optim, name)(theirs, **kwargs)
    run_side_by_side(ours_opt, theirs_opt, ours, theirs, 2)
    ours_sd, theirs_sd = ours_opt.state_dict(), theirs_opt.state_dict()
    assert sorted(ours_sd["state"]) == sorted(theirs_sd["state"])
    # Every hyperparameter torch.optim stores under a name we also use agrees.
    group_pairs = zip(ours_sd["param_groups"], theirs_sd["param_groups"], strict=True)
    for ours_group, theirs_group in group_pairs:
        for key, value in ours_group.items():
            assert key in theirs_group, key
            assert theirs_group[key] == value, key
    for index, theirs_state in theirs_sd["state"].items():
        ours_keys, theirs_keys = set(ours_sd["state"][index]), set(theirs_state)
        # Equal, SGD's dampened momentum included: its "step" counter (to know the
        # first step; torch.optim.SGD tests for a missing buffer) stays out of state_dict().
        assert ours_keys == theirs_keys


def test_sgd_without_momentum_keeps_no_state_like_torch():
    ours, theirs = make_params(SHAPES)
    ours_opt = shardopt.SGD(ours, lr=0.1)
    theirs_opt = torch.optim.SGD(theirs, lr=0.1)
    run_side_by_side(ours_opt, theirs_opt, ours, theirs, 3)
    assert_params_equal(ours, theirs)
    assert theirs_opt.state_dict()["state"] == {}
    # Same checkpoint as torch.optim.SGD: no per-parameter entries at all.
    assert ours_opt.state_dict()["state"] == theirs_opt.state_dict()["state"]
    assert len(ours_opt.state) == 0


# ---------------------------------------------------------------------------
# torch machinery on shardopt optimizers: schedulers, closures, param groups


def _two_groups(params):
    return [
        {"params": params[:2], "lr": 0.02},
        {"params": params[2:], "lr": 0.005, "weight_decay": 0.1},
    ]


@pytest.mark.parametrize("scheduler", ["StepLR", "LambdaLR"])
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"])
def test_lr_schedulers_and_param_groups(name, scheduler):
    ours, theirs = make_params(SHAPES)
    kwargs = {"momentum": 0.9} if name in ("SGD", "RMSprop") else {}
    ours_opt = getattr(shardopt, name)(_two_groups(ours), lr=0.01, **kwargs)
    theirs_opt = getattr(torch.optim, name)(_two_groups(theirs), lr=0.01, **kwargs)

    def make_scheduler(opt):
        if scheduler == "StepLR":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))

    ours_sched, theirs_sched = make_scheduler(ours_opt), make_scheduler(theirs_opt)
    gen = torch.Generator().manual_seed(2)
    for _ in range(30):
        feed_same_grads(gen, ours, theirs)
        ours_opt.step()
        theirs_opt.step()
        ours_sched.step()
        theirs_sched.step()
    assert_params_equal(ours, theirs)
    ours_lrs = [group["lr"] for group in ours_opt.param_groups]
    assert ours_lrs == [group["lr"] for group in theirs_opt.param_groups]
    # The two groups kept their different rates through the schedule.
    if scheduler == "StepLR":
        assert ours_lrs == pytest.approx([0.02 * 0.5**4, 0.005 * 0.5**4])
    else:
        assert ours_lrs == pytest.approx([0.02 / 4.0, 0.005 / 4.0])


def test_param_groups_with_different_lrs_use_their_own_lr():
    ours, theirs = make_params([(4,), (4,)])
    ours_opt = shardopt.SGD([{"params": [ours[0]], "lr": 0.1}, {"params": [ours[1]]}], lr=0.01)
    for param in ours:
        param.grad = torch.ones(4)
    ours_opt.step()
    assert torch.allclose(theirs[0] - ours[0], torch.full((4,), 0.1))
    assert torch.allclose(theirs[1] - ours[1], torch.full((4,), 0.01))


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"])
def test_closure(name):
    gen = torch.Generator().manual_seed(4)
    inputs, targets = torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen)
    ours, theirs = make_params([(5, 3), (3,)])
    ours_opt = getattr(shardopt, name)(ours, lr=0.01)
    theirs_opt = getattr(torch.optim, name)(theirs, lr=0.01)

    def make_closure(opt, weight, bias):
        def closure():
            opt.zero_grad()
            loss = ((inputs @ weight + bias - targets) ** 2).mean()
            loss.backward()
            return loss

        return closure

    ours_losses, theirs_losses = [], []
    for _ in range(25):
        ours_losses.append(ours_opt.step(make_closure(ours_opt, *ours)).item())
        theirs_losses.append(theirs_opt.step(make_closure(theirs_opt, *theirs)).item())
    assert ours_losses == theirs_losses
    assert ours_losses[-1] < ours_losses[0]
    assert_params_equal(ours, theirs)


def test_step_without_closure_returns_none_and_zero_grad_clears():
    ours, _ = make_params([(3,)])
    opt = shardopt.Adam(ours)
    ours[0].grad = torch.ones(3)
    assert opt.step() is None
    opt.zero_grad()
    assert ours[0].grad is None


# ---------------------------------------------------------------------------
# Muon against torch.optim.Muon (2-D parameters, bfloat16 Newton-Schulz)

MUON_CASES = [
    dict(),
    dict(lr=0.02),
    dict(lr=0.02, adjust_lr_fn="match_rms_adamw"),
    dict(lr=0.02, adjust_lr_fn="original"),
    dict(lr=0.02, nesterov=False),
    dict(lr=0.02, nesterov=False, adjust_lr_fn="match_rms_adamw"),
    dict(lr=0.02, weight_decay=0.0),
    dict(lr=0.02, momentum=0.9, weight_decay=0.3),
]


@pytest.mark.parametrize("kwargs", MUON_CASES, ids=[str(kw) for kw in MUON_CASES])
def test_muon_matches_torch_muon(kwargs):
    ours, theirs = make_params(MATRIX_SHAPES)
    ours_opt = shardopt.Muon(ours, **kwargs)
    theirs_opt = torch.optim.Muon(theirs, **kwargs)
    run_side_by_side(ours_opt, theirs_opt, ours, theirs, NUM_STEPS)
    assert_params_equal(ours, theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert set(ours_opt.state[a]) == set(theirs_opt.state[b]) == {"momentum_buffer"}
        assert torch.equal(ours_opt.state[a]["momentum_buffer"],
                           theirs_opt.state[b]["momentum_buffer"])


SAME_SHAPE_CASES = [dict(lr=0.02), dict(lr=0.02, nesterov=False, adjust_lr_fn="match_rms_adamw")]


@pytest.mark.parametrize("kwargs", SAME_SHAPE_CASES, ids=[str(kw) for kw in SAME_SHAPE_CASES])
def test_muon_matches_torch_muon_with_same_shape_matrices(kwargs):
    # torch.optim.Muon orthogonalizes each matrix on its own; the result for a
    # matrix must not change because other matrices of its shape share the group.
    ours, theirs = make_params(SAME_SHAPE_MATRICES, seed=7)
    ours_opt = shardopt.Muon(ours, **kwargs)
    theirs_opt = torch.optim.Muon(theirs, **kwargs)
    run_side_by_side(ours_opt, theirs_opt, ours, theirs, NUM_STEPS, seed=8)
    assert_params_equal(ours, theirs)


def test_muon_state_dict_round_trip_with_torch_muon():
    ours, _ = make_params(MATRIX_SHAPES)
    ours_opt = shardopt.Muon(ours, lr=0.02)
    gen = torch.Generator().manual_seed(9)
    for _ in range(5):
        feed_same_grads(gen, ours)
        ours_opt.step()
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    theirs_opt = torch.optim.Muon(theirs, lr=0.02)
    theirs_opt.load_state_dict(copy.deepcopy(ours_opt.state_dict()))
    run_side_by_side(ours_opt, theirs_opt, ours, theirs, 10, seed=10)
    assert_params_equal(ours, theirs)
    back = [p.detach().clone().requires_grad_() for p in theirs]
    back_opt = shardopt.Muon(back, lr=0.02)
    back_opt.load_state_dict(copy.deepcopy(theirs_opt.state_dict()))
    run_side_by_side(back_opt, theirs_opt, back, theirs, 10, seed=11)
    assert_params_equal(back, theirs)


# ---------------------------------------------------------------------------
# Lion against the published rule (Chen et al. 2023, Algorithm 2)


LION_CASES = [dict(lr=1e-3), dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.5), dict(lr=1e-4)]


def lion_reference_step(theta, m, g, lr, beta1, beta2, wd):
    """Chen et al. 2023, Algorithm 2, written out."""
    c = beta1 * m + (1 - beta1) * g
    theta = theta - lr * (torch.sign(c) + wd * theta)
    m = beta2 * m + (1 - beta2) * g
    return theta, m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", LION_CASES, ids=str)
def test_lion_matches_published_rule(kwargs, dtype):
    lr = kwargs["lr"]
    beta1, beta2 = kwargs.get("betas", (0.9, 0.99))
    wd = kwargs.get("weight_decay", 0.0)
    ours, reference = make_params(SHAPES, dtype=dtype)
    reference = [p.detach() for p in reference]
    moments = [torch.zeros_like(p) for p in reference]
    opt = shardopt.Lion(ours, **kwargs)
    gen = torch.Generator().manual_seed(12)
    for _ in range(NUM_STEPS):
        if dtype == torch.float32:
            # (1 - lr*wd)*theta and theta - lr*wd*theta round differently in
            # fp32; compare each step from the same point so rounding does not
            # accumulate over the run (float64 below checks the trajectory).
            reference = [p.detach().clone() for p in ours]
        feed_same_grads(gen, ours)
        opt.step()
        for i, (theta, m) in enumerate(zip(reference, moments, strict=True)):
            reference[i], moments[i] = lion_reference_step(
                theta, m, ours[i].grad, lr, beta1, beta2, wd
            )
        max_diff = max((a - b).abs().max().item() for a, b in zip(ours, reference, strict=True))
        assert max_diff <= (1e-6 if dtype == torch.float32 else 1e-12), max_diff
    for param, m in zip(ours, moments, strict=True):
        assert torch.allclose(
            opt.state[param]["exp_avg"], m, atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=0
        )
