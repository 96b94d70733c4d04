"""shardopt's optimizers against PyTorch's own optimizer test database.

``optim_db`` (torch/testing/_internal/common_optimizers.py, from the installed
torch) lists, per optimizer, the constructor configurations torch tests
(``optim_inputs_func``), the LR schedulers it runs them with
(``scheduler_inputs``) and the inputs that must raise (``optim_error_inputs_func``).
For SGD, Adagrad, RMSprop, Adam, AdamW and Muon, every CPU configuration, alone
and with each scheduler list, runs :data:`STEPS` steps in three copies: torch
throughout; torch up to :data:`SWAP_AT`, then shardopt loaded from torch's
state dict; shardopt up to it, then torch loaded from shardopt's. All three
must end bitwise equal, with torch's state-dict keys. Configurations torch lists
only for CUDA are counted and printed (:func:`test_cuda_only_configurations_are_counted`).
"""

from __future__ import annotations

import copy

import pytest
import torch

# torch.testing._internal imports expecttest, which the dev extra installs: a missing
# install must fail here, not skip the module.
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

import shardopt

NAMES = ("SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Muon")
INFOS = {info.name: info for info in optim_db if info.name in NAMES}
STEPS, SWAP_AT = 12, 6
SHAPES = {"Muon": [(4, 3), (5, 5), (2, 7)], "other": [(7,), (3, 4), (2, 3, 2)]}
# shardopt's own param-group keys (documented in shardopt.Muon); torch's are all kept.
EXTRA_GROUP_KEYS = {"Muon": {"ns_dtype", "use_muon"}}
IMPL_FLAGS = ("foreach", "fused", "differentiable")


def make_params(name, copies, seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in SHAPES.get(name, SHAPES["other"])]
    return [[t.clone().requires_grad_() for t in init] for _ in range(copies)]


def config_cases():
    cases = []
    for name in NAMES:
        if name not in INFOS:
            continue
        for index, optim_input in enumerate(INFOS[name].optim_inputs_func("cpu")):
            cases.append(pytest.param(name, index, id=f"{name}-{index}-{optim_input.desc}"))
    return cases


def step_schedulers(schedulers, loss):
    for scheduler in schedulers:
        scheduler.step(loss) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()


def reload(cls, params, kwargs, make_schedulers, schedulers, source_opt):
    """A new ``cls`` on ``params`` continuing from ``source_opt`` (and its schedulers),
    in the order torch's docs give: schedulers' state first, then the optimizer's."""
    opt = cls(params, **copy.deepcopy(kwargs))
    new_schedulers = [make(opt) for make in make_schedulers]
    for new, old in zip(new_schedulers, schedulers):
        new.load_state_dict(old.state_dict())
    opt.load_state_dict(copy.deepcopy(source_opt.state_dict()))
    return opt, new_schedulers


def assert_state_dicts_match(name, ours, theirs):
    assert ours["state"].keys() == theirs["state"].keys()
    for index, entry in theirs["state"].items():
        assert ours["state"][index].keys() == entry.keys(), index
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(ours["state"][index][key]), torch.as_tensor(value)), key
    for our_group, their_group in zip(ours["param_groups"], theirs["param_groups"], strict=True):
        assert set(our_group) - set(their_group) <= EXTRA_GROUP_KEYS.get(name, set())
        assert set(their_group) <= set(our_group)


def run_three_ways(name, kwargs, make_schedulers):
    """Torch throughout, torch->shardopt and shardopt->torch at SWAP_AT; returns the copies."""
    torch_cls, ours_cls = getattr(torch.optim, name), getattr(shardopt, name)
    params = make_params(name, 3)
    classes = [torch_cls, torch_cls, ours_cls]  # reference, torch then shardopt, shardopt then torch
    opts = [cls(p, **copy.deepcopy(kwargs)) for cls, p in zip(classes, params)]
    schedulers = [[make(opt) for make in make_schedulers] for opt in opts]
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        for group in zip(*params):
            grad = torch.randn(group[0].shape, generator=gen)
            for param in group:
                param.grad = grad.clone()
        for opt, scheds in zip(opts, schedulers):
            opt.step()
            step_schedulers(scheds, loss=1.0)
        if step == SWAP_AT:
            before = [opts[1], opts[2]]
            opts[1], schedulers[1] = reload(ours_cls, params[1], kwargs, make_schedulers, schedulers[1], before[0])
            opts[2], schedulers[2] = reload(torch_cls, params[2], kwargs, make_schedulers, schedulers[2], before[1])
            assert_state_dicts_match(name, before[1].state_dict(), before[0].state_dict())
    return params, opts


@pytest.mark.parametrize(("name", "index"), config_cases())
def test_config_matches_torch_with_and_without_schedulers(name, index):
    info = INFOS[name]
    kwargs = info.optim_inputs_func("cpu")[index].kwargs
    for make_schedulers in [[], *info.scheduler_inputs]:
        params, opts = run_three_ways(name, kwargs, make_schedulers)
        reference, *others = params
        for other in others:
            for a, b in zip(reference, other, strict=True):
                assert torch.equal(a, b), (name, kwargs, (a - b).abs().max().item())
        assert_state_dicts_match(name, opts[1].state_dict(), opts[0].state_dict())
        assert_state_dicts_match(name, opts[1].state_dict(), opts[2].state_dict())


@pytest.mark.parametrize("name", [n for n in NAMES if n in INFOS])
def test_implementation_flags_are_accepted_and_change_nothing(name):
    """torch's global flags (foreach, fused, differentiable where torch takes them on CPU):
    shardopt accepts them and stays bitwise equal to torch's default path, except that
    ``fused=True`` runs torch's fused kernels, bitwise equal to torch's fused path."""
    for optim_input in _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, INFOS[name]):
        kwargs = optim_input.kwargs
        plain = {k: v for k, v in kwargs.items() if k not in IMPL_FLAGS}
        theirs, ours = make_params(name, 2)
        reference = kwargs if kwargs.get("fused") else plain
        torch_opt = getattr(torch.optim, name)(theirs, **copy.deepcopy(reference))
        our_opt = getattr(shardopt, name)(ours, **copy.deepcopy(kwargs))
        assert {k: our_opt.param_groups[0][k] for k in IMPL_FLAGS if k in kwargs} == \
            {k: kwargs[k] for k in IMPL_FLAGS if k in kwargs}
        gen = torch.Generator().manual_seed(2)
        for _ in range(4):
            for a, b in zip(theirs, ours):
                a.grad = torch.randn(a.shape, generator=gen)
                b.grad = a.grad.clone()
            torch_opt.step()
            our_opt.step()
        for a, b in zip(theirs, ours):
            assert torch.equal(a, b), optim_input.desc


# torch.optim.Muon refuses every parameter that is not 2-D; shardopt.Muon takes stacks of
# matrices (3-D) and conv kernels on purpose (documented in shardopt.Muon).
DEVIATIONS = {("Muon", "only support 2D parameters")}


def error_cases():
    cases = []
    for name in NAMES:
        if name in INFOS:
            for index, error_input in enumerate(INFOS[name].optim_error_inputs_func("cpu", torch.float32)):
                desc = error_input.optimizer_error_input.desc
                cases.append(pytest.param(name, index, id=f"{name}-{index}-{desc}"))
    return cases


@pytest.mark.parametrize(("name", "index"), error_cases())
def test_error_input_raises_like_torch(name, index):
    error_input = INFOS[name].optim_error_inputs_func("cpu", torch.float32)[index]
    optim_input = error_input.optimizer_error_input
    if (name, optim_input.desc) in DEVIATIONS:
        getattr(shardopt, name)(optim_input.params, **optim_input.kwargs)
        return
    if error_input.error_type is UserWarning:
        with pytest.warns(UserWarning, match=error_input.error_regex):
            getattr(shardopt, name)(optim_input.params, **optim_input.kwargs)
        return

    def construct_and_step():
        # shardopt may refuse at construction what torch refuses only at the first step.
        opt = getattr(shardopt, name)(optim_input.params, **optim_input.kwargs)
        if error_input.error_on is OptimizerErrorEnum.STEP_ERROR:
            opt.step()

    with pytest.raises(error_input.error_type, match=error_input.error_regex):
        construct_and_step()


def test_cuda_only_configurations_are_counted():
    """The only configurations not run: those torch's optim_db lists for CUDA and not for CPU
    (capturable, and Tensor lr/betas with capturable), counted per optimizer."""
    skipped = {}
    for name, info in INFOS.items():
        cpu = {i.desc for i in info.optim_inputs_func("cpu")}
        only_cuda = [i.desc for i in info.optim_inputs_func("cuda") if i.desc not in cpu]
        if only_cuda:
            skipped[name] = len(only_cuda)
            print(f"{name}: {len(only_cuda)} CUDA-only configurations not run: {only_cuda}")
    run = {name: len(info.optim_inputs_func("cpu")) * (1 + len(info.scheduler_inputs))
           for name, info in INFOS.items()}
    print(f"runs (configurations x scheduler lists, with and without): {run}, total {sum(run.values())}")
    assert set(INFOS) == set(NAMES)
    assert skipped == {"Adam": 5, "AdamW": 5, "RMSprop": 3}
    assert sum(run.values()) == 166


# ---------------------------------------------------------------------------
# Beyond optim_db's CPU list: checkpoints of every kind, Tensor hyperparameters,
# the flag combinations torch lists as CUDA error inputs, host synchronisation.


def train(opt, params, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=gen)
        opt.step()


def assert_continues_like_torch(torch_opt, torch_params, ours, our_params, steps=5):
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    train(torch_opt, torch_params, steps, seed=7)
    train(ours, our_params, steps, seed=7)
    for a, b in zip(torch_params, our_params, strict=True):
        assert torch.equal(a, b), (a - b).abs().max().item()


def test_torch_adam_decoupled_checkpoint_continues_decoupled():
    theirs, ours = make_params("Adam", 2)
    torch_opt = torch.optim.Adam(theirs, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)
    train(torch_opt, theirs, 5, seed=3)
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.copy_(b)
    our_opt = shardopt.Adam(ours, lr=0.01, weight_decay=0.1)  # L2 until the checkpoint says otherwise
    assert_continues_like_torch(torch_opt, theirs, our_opt, ours)
    assert our_opt.param_groups[0]["decoupled_weight_decay"] is True


def test_adam_decoupled_weight_decay_is_adamw():
    theirs, ours = make_params("Adam", 2)
    torch_opt = torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.1)
    our_opt = shardopt.Adam(ours, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)
    train(torch_opt, theirs, 8, seed=4)
    train(our_opt, ours, 8, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours))


def test_torch_muon_checkpoint_continues_with_torch_semantics():
    theirs, ours = make_params("Muon", 2)
    torch_opt = torch.optim.Muon(theirs, lr=0.02)
    train(torch_opt, theirs, 3, seed=5)
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.copy_(b)
    # ns_dtype is shardopt's own key: torch's checkpoint lacks it and means bfloat16.
    our_opt = shardopt.Muon(ours, lr=0.02, ns_dtype="float32")
    assert_continues_like_torch(torch_opt, theirs, our_opt, ours)
    assert our_opt.param_groups[0]["ns_dtype"] == "bfloat16"


@pytest.mark.parametrize("name", ["SGD", "Adam", "Muon"])
def test_param_names_are_kept_like_torch(name):
    theirs, ours = make_params(name, 2)
    kwargs = {"momentum": 0.9} if name == "SGD" else {}
    torch_opt = getattr(torch.optim, name)([(f"w{i}", p) for i, p in enumerate(theirs)], **kwargs)
    our_opt = getattr(shardopt, name)([(f"w{i}", p) for i, p in enumerate(ours)], **kwargs)
    train(torch_opt, theirs, 2, seed=6)
    train(our_opt, ours, 2, seed=6)
    assert our_opt.state_dict()["param_groups"][0]["param_names"] == ["w0", "w1", "w2"]
    assert_state_dicts_match(name, our_opt.state_dict(), torch_opt.state_dict())
    # Both ways, names included.
    torch_opt.load_state_dict(our_opt.state_dict())
    our_opt.load_state_dict(torch_opt.state_dict())


def test_checkpoint_of_another_optimizer_is_refused_before_anything_changes():
    sgd_params, adam_params = make_params("Adam", 2)
    sgd = torch.optim.SGD(sgd_params, lr=0.1, momentum=0.9)
    train(sgd, sgd_params, 2, seed=8)
    adam = shardopt.Adam(adam_params, lr=0.01)
    train(adam, adam_params, 2, seed=8)
    before = copy.deepcopy(adam.state_dict())
    with pytest.raises(ValueError, match=r"state\[0\].*'momentum_buffer'.*does not keep"):
        adam.load_state_dict(sgd.state_dict())
    assert_state_dicts_match("Adam", adam.state_dict(), before)
    short = copy.deepcopy(before)
    short["state"][1]["exp_avg"] = short["state"][1]["exp_avg"][:1]
    with pytest.raises(ValueError, match=r"state\[1\].*'exp_avg'.*shape"):
        adam.load_state_dict(short)
    lacking = copy.deepcopy(before)
    del lacking["state"][2]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"state\[2\].*lacks \['exp_avg_sq'\]"):
        adam.load_state_dict(lacking)
    assert_state_dicts_match("Adam", adam.state_dict(), before)


@pytest.mark.parametrize(("name", "kwargs"), [
    ("Adam", {"lr": torch.tensor(0.01), "betas": (torch.tensor(0.9), torch.tensor(0.99))}),
    ("AdamW", {"lr": torch.tensor([0.01]), "betas": (torch.tensor([[0.8]]), torch.tensor(0.95)),
               "amsgrad": True}),
    ("Adam", {"lr": torch.tensor(0.01), "weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("RMSprop", {"lr": torch.tensor(0.01), "momentum": 0.5, "centered": True}),
    ("SGD", {"lr": torch.tensor(0.05), "weight_decay": torch.tensor(0.1), "momentum": 0.9}),
], ids=str)
def test_tensor_hyperparameters_match_torch(name, kwargs):
    theirs, ours = make_params(name, 2)
    torch_opt = getattr(torch.optim, name)(theirs, **copy.deepcopy(kwargs))
    our_opt = getattr(shardopt, name)(ours, **copy.deepcopy(kwargs))
    train(torch_opt, theirs, 8, seed=9)
    train(our_opt, ours, 8, seed=9)
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours))


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "Adam", "AdamW"])
@pytest.mark.parametrize(("flags", "match"), [
    ({"fused": True, "foreach": True}, "`fused` and `foreach` cannot be `True` together"),
    ({"fused": True, "differentiable": True}, "`fused` does not support `differentiable`"),
])
def test_flag_combinations_torch_refuses(name, flags, match):
    """torch lists these as CUDA error inputs; shardopt refuses them on any device."""
    with pytest.raises(RuntimeError, match=match):
        getattr(torch.optim, name)(make_params(name, 1)[0], **flags)
    with pytest.raises(RuntimeError, match=match):
        getattr(shardopt, name)(make_params(name, 1)[0], **flags)


@pytest.mark.parametrize(("name", "kwargs"), [
    ("SGD", {"momentum": 0.9, "dampening": 0.5}), ("Adagrad", {"lr_decay": 0.1}),
    ("RMSprop", {"centered": True, "momentum": 0.5}), ("Adam", {"amsgrad": True}),
    ("AdamW", {"lr": torch.tensor(0.01)}), ("Muon", {"lr": torch.tensor(0.02)}),
], ids=str)
def test_host_reads_per_step_do_not_grow_with_parameters(name, kwargs, monkeypatch):
    """No host synchronisation per parameter: the Tensor-to-host reads of one step
    (item, float, tolist) are as many for 24 parameters as for 3, and step stays on the CPU."""
    reads = []
    for method in ("item", "__float__", "tolist"):
        original = getattr(torch.Tensor, method)

        def counting(self, *args, _original=original, **kw):
            reads.append(1)
            return _original(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, method, counting)
    counts = []
    for copies in (1, 8):
        params = [p for _ in range(copies) for p in make_params(name, 1)[0]]
        opt = getattr(shardopt, name)(params, **copy.deepcopy(kwargs))
        for _ in range(2):  # the second step runs on existing state
            for param in params:
                param.grad = torch.ones_like(param)
            reads.clear()
            opt.step()
        counts.append(len(reads))
        assert all(s.device.type == "cpu" for st in opt.state.values() for k, s in st.items() if k == "step")
    assert counts[0] == counts[1], counts
    assert counts[1] <= 2, counts
