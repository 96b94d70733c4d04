"""ZeroOptimizer without a process group: it must behave like the wrapped optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
import zero_workers as w
from torch import nn

import shardopt
from shardopt import schedules


def run(model, opt, steps=10, start=0):
    for step in range(start, start + steps):
        w.lm_loss(model, w.batch(step)).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(("name", "ours", "reference", "hp"), w.CASES, ids=[c[0] for c in w.CASES])
@pytest.mark.parametrize("stage", [1, 2])
def test_world_size_one_equals_the_wrapped_optimizer_bitwise(name, ours, reference, hp, stage):
    torch.manual_seed(0)
    model = w.TinyLM()
    ref = copy.deepcopy(model)
    run(model, shardopt.ZeroOptimizer(model.parameters(), ours, stage=stage, **hp))
    run(ref, reference(ref.parameters(), **hp))
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_a_second_optimizer_on_the_same_parameters_waits_for_close():
    # Before close() existed, the first optimizer's hooks kept taking the gradients
    # and the second one stepped with zeros, silently.
    torch.manual_seed(0)
    model = w.TinyLM()
    ref = copy.deepcopy(model)
    first = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, **w.HP)
    run(model, first, steps=2)
    with pytest.raises(ValueError, match=r"gate is already managed by another ZeroOptimizer.*close\(\)"):
        shardopt.ZeroOptimizer(model.named_parameters(), shardopt.AdamW, **w.HP)
    first.close()
    first.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        first.step()
    second = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, **w.HP)
    run(model, second, steps=3, start=2)
    ref_first = torch.optim.AdamW(ref.parameters(), **w.HP)
    run(ref, ref_first, steps=2)
    run(ref, torch.optim.AdamW(ref.parameters(), **w.HP), steps=3, start=2)  # fresh state, as `second`
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_a_dropped_optimizer_releases_its_parameters_once_closed():
    model = w.TinyLM()
    shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, lr=1e-3).close()
    shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, lr=1e-3)  # no error


def test_torch_optim_classes_map_to_shardopt_and_others_are_refused():
    model = w.TinyLM()
    opt = shardopt.ZeroOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    assert isinstance(opt.inner, shardopt.AdamW)
    with pytest.raises(TypeError, match="optimizer_class"):
        shardopt.ZeroOptimizer(w.TinyLM().parameters(), torch.optim.LBFGS)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"stage": 3}, ValueError, "stage"),
        ({"stage": True}, ValueError, "stage"),
        ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
        ({"max_grad_norm": float("nan")}, ValueError, "max_grad_norm"),
        ({"lr": -1.0}, ValueError, "lr"),
        ({"betas": (1.0, 0.9)}, ValueError, "beta"),
        ({"bucket_numel": 0}, ValueError, "bucket_numel"),
        ({"bucket_numel": "1e6"}, ValueError, "bucket_numel"),
        ({"precision": "bf16"}, TypeError, "precision.*PrecisionPolicy"),
        ({"overlap": "yes"}, TypeError, "overlap"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        shardopt.ZeroOptimizer(w.TinyLM().parameters(), shardopt.AdamW, **kwargs)


def test_float16_is_refused_for_want_of_loss_scaling():
    with pytest.raises(ValueError, match=r"gate is float16.*loss scaling"):
        shardopt.ZeroOptimizer(w.TinyLM().half().named_parameters(), shardopt.AdamW)
    with pytest.raises(ValueError, match=r"reduce_dtype=torch\.float16 needs loss scaling"):
        shardopt.ZeroOptimizer(w.TinyLM().parameters(), shardopt.AdamW,
                               precision=shardopt.PrecisionPolicy(reduce_dtype=torch.float16))


def test_a_non_float_reduce_dtype_is_refused():
    with pytest.raises(ValueError, match="reduce_dtype"):
        shardopt.PrecisionPolicy(reduce_dtype=torch.int64)
    with pytest.raises(ValueError, match="master_dtype"):
        shardopt.PrecisionPolicy(master_dtype="float32")


def test_add_param_group_after_construction_is_refused():
    opt = shardopt.ZeroOptimizer(w.TinyLM().parameters(), shardopt.AdamW)
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


def test_torch_and_shardopt_schedulers_drive_param_groups():
    torch.manual_seed(0)
    model = w.TinyLM()
    ref = copy.deepcopy(model)
    opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, lr=0.01)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01)
    sched = schedules.as_lr_scheduler(opt, schedules.warmup_cosine(3, 10))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, schedules.warmup_cosine(3, 10))
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    ref_step_lr = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=4, gamma=0.5)
    for step in range(10):
        run(model, opt, 1, step)
        run(ref, ref_opt, 1, step)
        for s in (sched, step_lr, ref_sched, ref_step_lr):
            s.step()
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_frozen_parameters_are_left_out_and_untouched():
    torch.manual_seed(0)
    model = w.TinyLM()
    model.embed.weight.requires_grad_(False)
    frozen = model.embed.weight.detach().clone()
    opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, lr=0.01, weight_decay=0.5)
    run(model, opt, 3)
    assert torch.equal(model.embed.weight, frozen)
    index = next(i for i, p in enumerate(model.parameters()) if p is model.embed.weight)
    assert all(slot.param != index for b in opt.plan.buckets for slot in b.slots)
    # The full state dict is keyed like the unsharded optimizer's: the frozen one has no state.
    state = opt.full_state_dict()["state"]
    assert index not in state
    assert len(state) == len(list(model.parameters())) - 1


def test_parameters_are_views_of_the_storages():
    model = w.TinyLM()
    opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, bucket_numel=300)
    storages = {s.param_flat.untyped_storage().data_ptr() for s in opt.storages}
    for param in model.parameters():
        assert param.untyped_storage().data_ptr() in storages


def test_second_backward_without_no_sync_is_a_clear_error_and_loses_nothing():
    torch.manual_seed(0)
    model = w.TinyLM()
    ref = copy.deepcopy(model)
    opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW)
    ref_opt = torch.optim.AdamW(ref.parameters())
    w.lm_loss(model, w.batch(0)).backward()
    with pytest.raises(RuntimeError, match="no_sync"):
        w.lm_loss(model, w.batch(1)).backward()
    # Autograd added to p.grad before the hook could refuse: the step is refused until
    # zero_grad() discards it, and the optimizer is then as if that step never began.
    with pytest.raises(RuntimeError, match="call zero_grad"):
        opt.step()
    opt.zero_grad()
    for step in (2, 3):
        w.lm_loss(model, w.batch(step)).backward()
        opt.step()
        opt.zero_grad()
        w.lm_loss(ref, w.batch(step)).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("checkpointed", ["last", "first"])
def test_activation_checkpointing_reentrant_or_not(use_reentrant, checkpointed):
    # A reentrant checkpoint runs a nested backward inside the outer one; its end must
    # not be taken for the end of the step's backward (gradients of the layers outside
    # the checkpoint would be zero-filled, then refused when they arrive).
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    ref = copy.deepcopy(model)
    opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.SGD, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        if checkpointed == "last":
            y = checkpoint(model[2], model[1](model[0](x)), use_reentrant=use_reentrant)
        else:
            y = model[2](checkpoint(lambda t: model[1](model[0](t)), x.requires_grad_(), use_reentrant=use_reentrant))
        y.square().mean().backward()
        assert all(p.grad is not None for p in model.parameters())  # finished at the end of backward
        opt.step()
        opt.zero_grad()
        ref(x).square().mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_large_finite_gradients_are_not_mistaken_for_non_finite():
    model = w.TinyLM()
    opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.SGD, lr=1e-30, max_grad_norm=1.0)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e20)  # squares overflow fp32; the norm does not
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    numel = sum(p.numel() for p in model.parameters())
    assert opt.num_skipped_steps == 0
    assert opt.last_grad_norm == pytest.approx(1e20 * numel**0.5, rel=1e-6)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    opt.step()
    assert opt.num_skipped_steps == 1


def test_memory_report_is_measured_and_fp32_has_no_master_copy():
    model = w.TinyLM()
    numel = sum(p.numel() for p in model.parameters())
    opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW)
    before = opt.memory_report()
    assert before["optimizer_states"] == {}
    run(model, opt, 1)
    report = opt.memory_report()
    assert report["master_params"] == 0
    assert report["optimizer_states"]["exp_avg"] == numel * 4
    assert report["optimizer_states"]["exp_avg_sq"] == numel * 4
    assert report["optimizer_states"]["step"] == 4 * len(opt.plan.buckets)
    assert report["params"] == opt.plan.flat_numel * 4
    assert report["total"] >= report["params"] + report["grads"] + 8 * numel


def test_manual_gradients_without_backward_hooks_are_used():
    torch.manual_seed(0)
    model = w.TinyLM()
    ref = copy.deepcopy(model)
    opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.SGD, lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for p, q in zip(model.parameters(), ref.parameters()):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    ref_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_named_parameters_label_errors():
    model = w.TinyLM()
    model.gate.data = model.gate.data.to(torch.complex64)
    with pytest.raises(TypeError, match="gate"):
        shardopt.ZeroOptimizer(model.named_parameters(), shardopt.AdamW)



def test_a_heavily_padded_plan_warns():
    import warnings

    from plan_infos import param_info

    from shardopt.zero.checks import warn_if_padded

    big = [param_info(i, f"m{i}", (1024, 1024), "float32", 0, shardopt.Granularity.MATRIX) for i in range(2)]
    # Two whole 1M-element matrices over 8 ranks: six areas are all padding.
    with pytest.warns(UserWarning, match="matrix_layout='balanced'"):
        warn_if_padded(shardopt.plan_shards(big, 8, matrix_layout="whole"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_padded(shardopt.plan_shards(big, 2, matrix_layout="whole"))
        warn_if_padded(shardopt.plan_shards(big, 8))  # balanced: a quarter matrix per rank
