"""``fused=True``: torch's fused kernels, bitwise equal to torch.optim with ``fused=True``.

The single-process optimizers and the ZeRO engine (one flat fp32 area per rank)
call ``torch._fused_adam_`` and its siblings as torch.optim does, so every case
here must match bitwise: parameters and states after many steps, with the
variants each kernel has (maximize, weight decay, amsgrad, nesterov, dampening,
Tensor lr), under ``torch.amp.GradScaler``, and through the ZeRO engine.

torch's CPU kernels round some elements differently in their vector loop and in
their scalar tail at a tensor's end (SGD with momentum, Adam with maximize), so
the engine calls them per parameter piece of its flat area; the ZeRO cases here
include both.
"""

from __future__ import annotations

import copy

import pytest
import torch
import zero_workers as w

import shardopt
from shardopt.rules.base import CPU_CHUNK_NUMEL

NUM_STEPS = 8
# Odd sizes (the kernels' vector loop and scalar tail) and one tensor above the
# CPU chunk size of the default path (which the fused path does not chunk).
SHAPES = [(1,), (7,), (5, 3), (2, 3, 5), (33, 65), (CPU_CHUNK_NUMEL + 5,)]

CASES = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05, maximize=True)),
    ("SGD", dict(lr=torch.tensor(0.05), momentum=0.8, weight_decay=torch.tensor(0.1))),
    ("Adagrad", dict(lr=0.1, lr_decay=0.02, initial_accumulator_value=0.1, weight_decay=0.1)),
    ("Adagrad", dict(lr=torch.tensor(0.1), maximize=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, amsgrad=True, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, weight_decay=0.1, maximize=True, decoupled_weight_decay=True)),
    ("Adam", dict(lr=torch.tensor([0.01]), betas=(torch.tensor(0.9), torch.tensor(0.99)))),
    ("AdamW", dict(lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, amsgrad=True, weight_decay=0.3, maximize=True)),
]


def pair(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(shape, generator=gen) for shape in shapes]
    return [t.clone().requires_grad_() for t in init], [t.clone().requires_grad_() for t in init]


def step_both(optimizers, param_lists, gen):
    for group in zip(*param_lists, strict=True):
        grad = torch.randn(group[0].shape, generator=gen)
        for param in group:
            param.grad = grad.clone()
    for optimizer in optimizers:
        optimizer.step()


def assert_same(ours_opt, theirs_opt, ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b), (a - b).abs().max().item()
        for key, value in theirs_opt.state[b].items():
            assert torch.equal(ours_opt.state[a][key], value), key
            assert ours_opt.state[a][key].device == value.device, key


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_fused_matches_torch_fused_bitwise(name, kwargs):
    ours, theirs = pair(SHAPES)
    ours_opt = getattr(shardopt, name)(ours, fused=True, **copy.deepcopy(kwargs))
    theirs_opt = getattr(torch.optim, name)(theirs, fused=True, **copy.deepcopy(kwargs))
    assert getattr(ours_opt, "_step_supports_amp_scaling", False) == getattr(
        theirs_opt, "_step_supports_amp_scaling", False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(NUM_STEPS):
        step_both([ours_opt, theirs_opt], [ours, theirs], gen)
    assert_same(ours_opt, theirs_opt, ours, theirs)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_grad_scaler_drives_the_fused_kernel_as_torchs(name):
    ours, theirs = pair([(5, 3), (33,)])
    kwargs = dict(lr=0.05, momentum=0.9) if name == "SGD" else dict(lr=0.01)
    optimizers = [getattr(shardopt, name)(ours, fused=True, **kwargs),
                  getattr(torch.optim, name)(theirs, fused=True, **kwargs)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) for _ in range(2)]
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        target = torch.randn(3, generator=gen)
        if step == 3:
            target[0] = float("inf")  # a skipped step: no update, step counts unchanged
        for params, optimizer, scaler in zip((ours, theirs), optimizers, scalers, strict=True):
            loss = (params[0].sum(0) * target).sum() + params[1].square().sum()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    assert scalers[0].get_scale() == scalers[1].get_scale()
    assert_same(optimizers[0], optimizers[1], ours, theirs)


def test_grad_scale_without_fused_is_refused_as_torch_refuses_it():
    param = torch.nn.Parameter(torch.randn(3))
    param.grad = torch.randn(3)
    opt = shardopt.Adam([param])
    opt.grad_scale = torch.tensor(2.0)
    with pytest.raises(RuntimeError, match="only supported with fused=True"):
        opt.step()


ZERO_CASES = [
    (shardopt.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    (shardopt.Adagrad, dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1)),
    (shardopt.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.01, maximize=True)),
    (shardopt.AdamW, dict(lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)),
]


@pytest.mark.parametrize(("optimizer_class", "hp"), ZERO_CASES, ids=[c[0].__name__ for c in ZERO_CASES])
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_engine_fused_equals_single_process_and_torch_fused(optimizer_class, hp, stage):
    torch.manual_seed(0)
    model = w.TinyLM()
    single, reference = copy.deepcopy(model), copy.deepcopy(model)
    engine = shardopt.ZeroOptimizer(model.parameters(), optimizer_class, stage=stage, fused=True, **hp)
    single_opt = optimizer_class(single.parameters(), fused=True, **hp)
    torch_opt = getattr(torch.optim, optimizer_class.__name__)(reference.parameters(), fused=True, **hp)
    for step in range(4):
        for net, opt in ((model, engine), (single, single_opt), (reference, torch_opt)):
            w.lm_loss(net, w.batch(step)).backward()
            opt.step()
            opt.zero_grad()
    for p, q, r in zip(model.parameters(), single.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(p, r)
    # The full checkpoint carries torch's fused state: it loads into torch.optim.
    full = engine.full_state_dict()
    assert all(group["fused"] for group in full["param_groups"])
    torch_opt.load_state_dict(full)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "kwargs"), [c for c in CASES if not any(
    isinstance(v, torch.Tensor) or (isinstance(v, tuple) and isinstance(v[0], torch.Tensor)) for v in c[1].values())])
def test_fused_matches_torch_fused_bitwise_on_cuda(name, kwargs):
    ours, theirs = ([p.detach().cuda().requires_grad_() for p in side] for side in pair(SHAPES))
    ours_opt = getattr(shardopt, name)(ours, fused=True, **kwargs)
    theirs_opt = getattr(torch.optim, name)(theirs, fused=True, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(NUM_STEPS):
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=gen).cuda()
            b.grad = a.grad.clone()
        ours_opt.step()
        theirs_opt.step()
    assert_same(ours_opt, theirs_opt, ours, theirs)
