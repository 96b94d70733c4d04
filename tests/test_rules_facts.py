"""The optimizer chapter's worked facts (sections 7-11), checked on the rules,
and the state each rule declares against what it allocates."""

from __future__ import annotations

import math

import pytest
import torch

import shardopt
from shardopt import rules


def seeded(*shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------
# Adam / AdamW (chapter 9.1, 10.2)


def test_adam_bias_correction_at_t1_multiplies_m_by_10():
    # Chapter 9.1: at t = 1, 1 - beta1 = 0.1 so m_hat_1 = m_1 / 0.1 = 10 m_1.
    lr, eps, beta1, beta2 = 1e-2, 1e-8, 0.9, 0.999
    theta0 = seeded(5, seed=1)
    grad = seeded(5, seed=2)
    param = theta0.clone().requires_grad_()
    opt = shardopt.Adam([param], lr=lr, betas=(beta1, beta2), eps=eps)
    param.grad = grad.clone()
    opt.step()
    state = opt.state[param]
    m1, v1 = state["exp_avg"], state["exp_avg_sq"]
    assert state["step"].item() == 1.0
    torch.testing.assert_close(m1, (1 - beta1) * grad)
    m_hat = 10 * m1
    torch.testing.assert_close(m_hat, m1 / (1 - beta1**1))
    torch.testing.assert_close(m_hat, grad)  # bias correction undoes the shrink exactly
    v_hat = v1 / (1 - beta2)
    expected = theta0 - lr * m_hat / (v_hat.sqrt() + eps)
    torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-14)
    # So Adam's first step moves every coordinate by about lr, whatever |g|.
    moved = (param.detach() - theta0).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, lr), rtol=1e-5, atol=0)


def test_adamw_update_by_hand_for_three_steps():
    lr, wd, eps, beta1, beta2 = 1e-2, 0.1, 1e-8, 0.9, 0.95
    theta = seeded(4, 3, seed=3)
    param = theta.clone().requires_grad_()
    opt = shardopt.AdamW([param], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    for t in range(1, 4):
        grad = seeded(4, 3, seed=10 + t)
        param.grad = grad.clone()
        opt.step()
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad**2
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        theta = (1 - lr * wd) * theta - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(param.detach(), theta, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[param]["exp_avg"], m, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[param]["exp_avg_sq"], v, rtol=1e-12, atol=1e-14)


def _decay_effect(optimizer_cls, wd, lr=1e-2, warmup_steps=20):
    """Per-coordinate shrinkage weight decay adds in one step, in units of lr*wd*theta.

    Coordinate 0 sees large gradients, coordinate 1 small ones. Both copies
    train without decay, then take one step from the same state, one with decay
    and one without; the difference is what the decay did.
    """
    theta = torch.tensor([1.0, 1.0], dtype=torch.float64)
    scales = torch.tensor([10.0, 0.01], dtype=torch.float64)
    with_wd = theta.clone().requires_grad_()
    without_wd = theta.clone().requires_grad_()
    opt_with = optimizer_cls([with_wd], lr=lr, weight_decay=0.0)
    opt_without = optimizer_cls([without_wd], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for step in range(warmup_steps + 1):
        grad = scales * torch.randn(2, generator=gen, dtype=torch.float64)
        with_wd.grad, without_wd.grad = grad.clone(), grad.clone()
        if step == warmup_steps:
            before = with_wd.detach().clone()
            opt_with.param_groups[0]["weight_decay"] = wd
        opt_with.step()
        opt_without.step()
    return (without_wd - with_wd).detach() / (lr * wd * before)


def test_l2_in_adam_is_weaker_on_large_gradient_coordinates():
    # Chapter 10.1: lambda*theta is divided by sqrt(v_hat), so the coordinate
    # with large gradients is barely regularised and the small one strongly.
    effect = _decay_effect(shardopt.Adam, wd=1e-3)
    large, small = effect.tolist()
    assert 0 < large < small
    assert small / large > 100


def test_decoupled_decay_in_adamw_is_the_same_factor_everywhere():
    # Chapter 10.2: theta <- (1 - lr*wd) theta - ..., independent of gradients.
    effect = _decay_effect(shardopt.AdamW, wd=1e-3)
    torch.testing.assert_close(effect, torch.ones(2, dtype=torch.float64), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------
# AdaGrad (chapter 8.1): the rate only goes down


@pytest.mark.parametrize("lr_decay", [0.0, 0.01])
def test_adagrad_effective_rate_never_increases(lr_decay):
    lr, eps = 0.1, 1e-10
    param = seeded(6, seed=4).requires_grad_()
    opt = shardopt.Adagrad([param], lr=lr, lr_decay=lr_decay, eps=eps)
    gen = torch.Generator().manual_seed(5)
    previous = torch.full((6,), math.inf, dtype=torch.float64)
    for step in range(1, 101):
        # Some coordinates see zero gradient on some steps: the rate then stays put.
        grad = torch.randn(6, generator=gen, dtype=torch.float64)
        grad = grad * (torch.rand(6, generator=gen) > 0.3)
        before = param.detach().clone()
        param.grad = grad
        opt.step()
        lr_t = lr / (1 + (step - 1) * lr_decay)
        rate = lr_t / (opt.state[param]["sum"].sqrt() + eps)
        # The rate read from the state is the one the step used.
        torch.testing.assert_close(before - param.detach(), rate * grad, rtol=1e-12, atol=1e-15)
        assert bool((rate <= previous).all()), step
        previous = rate


# ---------------------------------------------------------------------------
# SGD (chapter 10.1): L2 regularisation and weight decay are the same thing


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_weight_decay_equals_l2_penalty_in_the_loss(momentum):
    wd, lr = 0.05, 0.1
    gen = torch.Generator().manual_seed(6)
    inputs = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    targets = torch.randn(32, generator=gen, dtype=torch.float64)
    init = torch.randn(5, generator=gen, dtype=torch.float64)
    decayed = init.clone().requires_grad_()
    penalised = init.clone().requires_grad_()
    opt_decay = shardopt.SGD([decayed], lr=lr, momentum=momentum, weight_decay=wd)
    opt_penalty = shardopt.SGD([penalised], lr=lr, momentum=momentum)
    for _ in range(50):
        for param, opt, penalty in ((decayed, opt_decay, 0.0), (penalised, opt_penalty, wd)):
            opt.zero_grad()
            loss = ((inputs @ param - targets) ** 2).mean() + penalty / 2 * param.pow(2).sum()
            loss.backward()
            opt.step()
    torch.testing.assert_close(decayed, penalised, rtol=1e-10, atol=1e-12)


def test_sgd_weight_decay_is_multiplicative_shrinkage_without_momentum():
    # theta <- theta - lr (g + wd theta) = (1 - lr wd) theta - lr g.
    lr, wd = 0.1, 0.3
    theta = seeded(7, seed=7)
    grad = seeded(7, seed=8)
    param = theta.clone().requires_grad_()
    opt = shardopt.SGD([param], lr=lr, weight_decay=wd)
    param.grad = grad
    opt.step()
    torch.testing.assert_close(param.detach(), (1 - lr * wd) * theta - lr * grad)


# ---------------------------------------------------------------------------
# State declarations


DECLARATIONS = [
    (rules.SGDRule(), {}, ()),
    (rules.SGDRule(), {"momentum": 0.9}, ("momentum_buffer",)),
    (rules.SGDRule(), {"momentum": 0.9, "nesterov": True}, ("momentum_buffer",)),
    (rules.SGDRule(), {"momentum": 0.9, "dampening": 0.5}, ("momentum_buffer", "step")),
    (rules.AdagradRule(), {}, ("step", "sum")),
    (rules.RMSpropRule(), {}, ("step", "square_avg")),
    (rules.RMSpropRule(), {"momentum": 0.9, "centered": True},
     ("step", "square_avg", "momentum_buffer", "grad_avg")),
    (rules.AdamRule(), {}, ("step", "exp_avg", "exp_avg_sq")),
    (rules.AdamRule(), {"amsgrad": True}, ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    (rules.AdamWRule(), {}, ("step", "exp_avg", "exp_avg_sq")),
    (rules.AdamWRule(), {"amsgrad": True}, ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    (rules.LionRule(), {}, ("exp_avg",)),
    (rules.MuonRule(), {}, ("momentum_buffer",)),
]
OPTIMIZER_FOR_RULE = {
    "sgd": shardopt.SGD, "adagrad": shardopt.Adagrad, "rmsprop": shardopt.RMSprop,
    "adam": shardopt.Adam, "adamw": shardopt.AdamW, "lion": shardopt.Lion,
    "muon": shardopt.Muon,
}
DECL_IDS = [f"{rule.name}-{overrides}" for rule, overrides, _ in DECLARATIONS]


@pytest.mark.parametrize(("rule", "overrides", "names"), DECLARATIONS, ids=DECL_IDS)
def test_state_declaration(rule, overrides, names):
    hp = {**rule.defaults, **overrides}
    rule.validate(hp)
    specs = rule.state_specs(hp)
    assert tuple(spec.name for spec in specs) == names
    for spec in specs:
        if spec.name == "step":
            assert spec.shape is shardopt.StateShape.SCALAR
            assert spec.dtype == torch.float32
        else:
            assert spec.shape is shardopt.StateShape.PARAM


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize(("rule", "overrides", "names"), DECLARATIONS, ids=DECL_IDS)
def test_state_bytes_match_allocation(rule, overrides, names, dtype):
    shapes = [(3, 5), (4, 2, 2)] if rule.name == "muon" else [(1,), (7,), (3, 5)]
    params = [torch.zeros(shape, dtype=dtype, requires_grad=True) for shape in shapes]
    opt = OPTIMIZER_FOR_RULE[rule.name](params, **overrides)
    for param in params:
        param.grad = torch.ones_like(param)
    opt.step()
    group = opt.param_groups[0]
    for param in params:
        state = opt.state[param]
        assert tuple(state) == names
        allocated = sum(t.numel() * t.element_size() for t in state.values())
        assert allocated == rule.state_bytes(group, param.numel(), dtype)
        assert allocated == opt.rule_for_group(group).state_bytes(group, param.numel(), dtype)
        for name, tensor in state.items():
            expected_dtype = torch.float32 if name == "step" else dtype
            assert tensor.dtype == expected_dtype, name


def test_state_bytes_worked_numbers():
    # Adam keeps two fp32 moments (8 bytes/param) plus a 4-byte step; Muon one
    # moment (the chapter's "50% less optimizer memory" for the matrices).
    numel = 1000
    adam = rules.AdamRule()
    muon = rules.MuonRule()
    assert adam.state_bytes(adam.defaults, numel, torch.float32) == 8 * numel + 4
    assert muon.state_bytes(muon.defaults, numel, torch.float32) == 4 * numel
    sgd = rules.SGDRule()
    assert sgd.state_bytes(sgd.defaults, numel, torch.float32) == 0
