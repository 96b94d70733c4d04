"""Bad inputs: every rejection is a ValueError or TypeError whose message names
the offending argument (or parameter), in torch.optim's style."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import shardopt

NAN, INF = math.nan, math.inf
ALL = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Lion", "Muon"]
WITH_BETAS = ["Adam", "AdamW", "Lion"]
WITH_EPS = ["Adagrad", "RMSprop", "Adam", "AdamW", "Muon"]


def params_for(name):
    shape = (4, 3) if name == "Muon" else (3,)
    return [torch.zeros(shape, requires_grad=True)]


CASES = []
for opt_name in ALL:
    CASES += [
        (opt_name, {"lr": -0.1}, ValueError, r"Invalid learning rate: -0\.1 \(lr: "),
        (opt_name, {"lr": NAN}, ValueError, r"Invalid learning rate: nan \(lr: "),
        (opt_name, {"lr": INF}, ValueError, r"Invalid learning rate: inf \(lr: "),
        (opt_name, {"lr": "0.1"}, TypeError, r"Invalid learning rate: '0\.1' \(lr: "),
        (opt_name, {"weight_decay": -1e-2}, ValueError, r"Invalid weight_decay value: -0\.01"),
        (opt_name, {"weight_decay": NAN}, ValueError, r"Invalid weight_decay"),
    ]
for opt_name in WITH_BETAS:
    CASES += [
        (opt_name, {"betas": (1.0, 0.99)}, ValueError, r"Invalid beta parameter at index 0: 1\.0"),
        (opt_name, {"betas": (-0.1, 0.99)}, ValueError, r"Invalid beta parameter at index 0"),
        (opt_name, {"betas": (0.9, 1.0)}, ValueError, r"Invalid beta parameter at index 1: 1\.0"),
        (opt_name, {"betas": (0.9, 1.5)}, ValueError, r"Invalid beta parameter at index 1"),
        (opt_name, {"betas": (0.9, NAN)}, ValueError, r"Invalid beta parameter at index 1"),
        (opt_name, {"betas": (0.9,)}, TypeError, r"Invalid betas"),
        (opt_name, {"maximize": 1}, TypeError, r"Invalid maximize"),
    ]
for opt_name in WITH_EPS:
    CASES.append((opt_name, {"eps": -1e-8}, ValueError, r"Invalid epsilon value: -1e-08 \(eps: "))
CASES += [
    ("SGD", {"momentum": -0.9}, ValueError, r"Invalid momentum"),
    ("SGD", {"dampening": -0.5}, ValueError, r"Invalid dampening"),
    ("SGD", {"nesterov": True}, ValueError, r"Invalid nesterov"),
    ("SGD", {"nesterov": True, "momentum": 0.0}, ValueError, r"Invalid nesterov"),
    ("SGD", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, ValueError,
     r"Invalid nesterov"),
    ("SGD", {"nesterov": "yes", "momentum": 0.9}, TypeError, r"Invalid nesterov"),
    ("Adagrad", {"lr_decay": -0.1}, ValueError, r"Invalid lr_decay"),
    ("Adagrad", {"initial_accumulator_value": -1.0}, ValueError,
     r"Invalid initial_accumulator_value"),
    ("RMSprop", {"alpha": 1.0}, ValueError, r"Invalid alpha value: 1\.0"),
    ("RMSprop", {"alpha": -0.5}, ValueError, r"Invalid alpha"),
    ("RMSprop", {"momentum": -0.1}, ValueError, r"Invalid momentum"),
    ("RMSprop", {"centered": 1}, TypeError, r"Invalid centered"),
    ("Adam", {"amsgrad": "no"}, TypeError, r"Invalid amsgrad"),
    ("Muon", {"momentum": 1.0}, ValueError, r"Invalid momentum"),
    ("Muon", {"ns_steps": 0}, ValueError, r"Invalid ns_steps: 0"),
    ("Muon", {"ns_steps": -3}, ValueError, r"Invalid ns_steps"),
    ("Muon", {"ns_steps": 5.0}, TypeError, r"Invalid ns_steps: 5\.0"),
    ("Muon", {"ns_steps": "5"}, TypeError, r"Invalid ns_steps"),
    ("Muon", {"ns_steps": True}, TypeError, r"Invalid ns_steps"),
    ("Muon", {"ns_coefficients": "newton"}, ValueError, r"Invalid ns_coefficients.*'newton'"),
    ("Muon", {"ns_coefficients": (3.4445, -4.7750)}, ValueError, r"Invalid ns_coefficients"),
    ("Muon", {"ns_coefficients": (3.4, NAN, 2.0)}, ValueError, r"Invalid ns_coefficients"),
    ("Muon", {"ns_coefficients": (3.4, "b", 2.0)}, ValueError, r"Invalid ns_coefficients"),
    ("Muon", {"ns_coefficients": [(3.4, -4.7, 2.0), (1.0, 2.0)]}, ValueError,
     r"Invalid ns_coefficients"),
    ("Muon", {"ns_coefficients": ()}, ValueError, r"Invalid ns_coefficients"),
    ("Muon", {"adjust_lr_fn": "spectral"}, ValueError, r"Invalid adjust_lr_fn: 'spectral'"),
    ("Muon", {"ns_dtype": "float16"}, ValueError, r"Invalid ns_dtype: 'float16'"),
    ("Muon", {"ns_dtype": torch.float16}, ValueError, r"Invalid ns_dtype"),
    ("Muon", {"nesterov": None}, TypeError, r"Invalid nesterov"),
]
CASE_IDS = [f"{name}-{kwargs}" for name, kwargs, _, _ in CASES]


@pytest.mark.parametrize(("name", "kwargs", "error", "match"), CASES, ids=CASE_IDS)
def test_bad_hyperparameter_in_constructor(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        getattr(shardopt, name)(params_for(name), **kwargs)


@pytest.mark.parametrize(("name", "kwargs", "error", "match"), CASES, ids=CASE_IDS)
def test_bad_hyperparameter_in_param_group(name, kwargs, error, match):
    good = {"params": params_for(name)}
    bad = {"params": params_for(name), **kwargs}
    with pytest.raises(error, match=match):
        getattr(shardopt, name)([good, bad])


@pytest.mark.parametrize(("name", "kwargs", "error", "match"), CASES, ids=CASE_IDS)
def test_failed_add_param_group_leaves_optimizer_unchanged(name, kwargs, error, match):
    opt = getattr(shardopt, name)(params_for(name))
    before = [dict(group) for group in opt.param_groups]
    with pytest.raises(error, match=match):
        opt.add_param_group({"params": params_for(name), **kwargs})
    assert len(opt.param_groups) == 1
    assert opt.param_groups == before
    # The optimizer still works.
    for param in opt.param_groups[0]["params"]:
        param.grad = torch.ones_like(param)
    opt.step()


@pytest.mark.parametrize(
    ("adamw_kwargs", "error", "match"),
    [
        ({"betas": (0.9, 1.0)}, ValueError, r"Invalid beta parameter at index 1"),
        ({"lr": -1.0}, ValueError, r"Invalid learning rate"),
        ({"eps": -1.0}, ValueError, r"Invalid epsilon value"),
        ({"weight_decay": -1.0}, ValueError, r"Invalid weight_decay"),
    ],
    ids=str,
)
def test_muon_adamw_group_is_validated_as_adamw(adamw_kwargs, error, match):
    with pytest.raises(error, match=match):
        shardopt.Muon([{"params": [torch.zeros(3, requires_grad=True)], "use_muon": False,
                        **adamw_kwargs}])


# ---------------------------------------------------------------------------
# Bad parameters


def test_1d_parameter_in_muon_group_is_named_by_position():
    params = [torch.zeros(4, 3, requires_grad=True), torch.zeros(5, requires_grad=True)]
    with pytest.raises(ValueError, match=re.escape("param_groups[0]['params'][1]") + ".*1-D"):
        shardopt.Muon(params)


def test_1d_parameter_in_muon_group_is_named_by_name():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"^0\.bias: .*1-D.*use_muon=False"):
        shardopt.Muon(model.named_parameters())


def test_scalar_parameter_in_muon_group():
    with pytest.raises(ValueError, match=r"0-D"):
        shardopt.Muon([torch.zeros((), requires_grad=True)])


def test_1d_parameter_in_added_muon_group_leaves_optimizer_unchanged():
    opt = shardopt.Muon([("w", torch.zeros(4, 3, requires_grad=True))])
    with pytest.raises(ValueError, match=r"^norm\.weight: "):
        opt.add_param_group({"params": [("norm.weight", torch.zeros(4, requires_grad=True))]})
    assert len(opt.param_groups) == 1
    # The same 1-D parameter is fine in an AdamW group.
    opt.add_param_group({"params": [("norm.weight", torch.zeros(4, requires_grad=True))], "use_muon": False})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("name", ["SGD", "Adam", "Muon"])
def test_sparse_gradient_names_the_parameter(name):
    dense = params_for(name)[0]
    sparse_target = torch.zeros(6, 3, requires_grad=True)
    opt = getattr(shardopt, name)([("dense.w", dense), ("embedding.weight", sparse_target)])
    dense.grad = torch.ones_like(dense)
    sparse_target.grad = torch.sparse_coo_tensor(
        [[0, 2]], torch.ones(2, 3), (6, 3), check_invariants=True
    )
    with pytest.raises(TypeError, match=r"^embedding\.weight: sparse gradients"):
        opt.step()


def test_sparse_gradient_names_the_parameter_by_position():
    params = [torch.zeros(3, requires_grad=True), torch.zeros(6, 3, requires_grad=True)]
    opt = shardopt.AdamW(params)
    params[1].grad = torch.sparse_coo_tensor(
        [[1]], torch.ones(1, 3), (6, 3), check_invariants=True
    )
    with pytest.raises(TypeError, match=re.escape("param_groups[0]['params'][1]") + ": sparse"):
        opt.step()


@pytest.mark.parametrize("name", ALL)
def test_complex_parameter_is_rejected(name):
    shape = (4, 3) if name == "Muon" else (3,)
    param = torch.zeros(shape, dtype=torch.complex64, requires_grad=True)
    # A TypeError (shardopt's) that is also a RuntimeError (torch.optim.Muon's type).
    with pytest.raises(TypeError, match=r"^w: \w+ does not support complex parameters"):
        getattr(shardopt, name)([("w", param)])
    with pytest.raises(RuntimeError, match=r"does not support complex parameters"):
        getattr(shardopt, name)([("w", param)])


def test_integer_parameter_is_rejected():
    with pytest.raises(TypeError, match=re.escape("param_groups[0]['params'][0]")):
        shardopt.SGD([torch.zeros(3, dtype=torch.int64)])


@pytest.mark.parametrize("name", ALL)
def test_empty_parameter_list(name):
    with pytest.raises(ValueError, match=r"Invalid params: .*empty"):
        getattr(shardopt, name)([])


@pytest.mark.parametrize("name", ALL)
def test_single_tensor_as_params(name):
    with pytest.raises(TypeError, match=r"Invalid params: .*single Tensor"):
        getattr(shardopt, name)(params_for(name)[0])


@pytest.mark.parametrize("name", ALL)
def test_same_parameter_in_two_groups(name):
    param = params_for(name)[0]
    with pytest.raises(ValueError, match=r"more than one parameter group"):
        getattr(shardopt, name)([{"params": [param]}, {"params": [param]}])


def test_same_parameter_in_added_group_leaves_optimizer_unchanged():
    param = torch.zeros(3, requires_grad=True)
    opt = shardopt.Adam([param])
    with pytest.raises(ValueError, match=r"more than one parameter group"):
        opt.add_param_group({"params": [param], "lr": 0.5})
    assert len(opt.param_groups) == 1


def test_non_tensor_in_params():
    with pytest.raises(TypeError, match=re.escape("param_groups[0]['params'][1]")):
        shardopt.SGD([torch.zeros(3, requires_grad=True), 3.0])


def test_mixing_dicts_and_tensors():
    with pytest.raises(TypeError, match=r"Invalid params: param_groups\[1\]"):
        shardopt.SGD([{"params": [torch.zeros(3, requires_grad=True)]},
                      torch.zeros(2, requires_grad=True)])
