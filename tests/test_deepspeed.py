"""shardopt.integrations.deepspeed against real DeepSpeed (gloo, CPU, 2 ranks) and its config translation.

Two spawns (tests/deepspeed_workers.py): one runs every distributed scenario
(plugin against ZeroOptimizer alone, collective counts, schedulers, rules mode,
a checkpoint save); new processes then load that checkpoint and continue. The
translation, its warning and its refusals are checked in this process, without
DeepSpeed's engine.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # inherited by the spawned ranks

import shardopt
from shardopt.integrations import deepspeed_config as dc
from shardopt.integrations.deepspeed_config import check_scheduler, translate

HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed "
                                     "(pip install -e '.[deepspeed]')")

ADAMW = {"type": "AdamW", "params": {"lr": 0.01}}


def config(**extra):
    return {"train_micro_batch_size_per_gpu": 2, "shardopt": {"optimizer": ADAMW}, **extra}


# ---------------------------------------------------------------------- translation (no processes)


def test_translation_of_every_key():
    t = translate(config(
        gradient_clipping=0.5, gradient_accumulation_steps=4,
        shardopt={"optimizer": {"type": "muon", "params": {"lr": 0.02, "adamw_betas": [0.9, 0.95]}},
                  "stage": 1, "matrix_layout": "whole", "reduce_dtype": "bf16", "bucket_numel": 1000,
                  "overlap": False},
        scheduler={"type": "WarmupCosineLR", "params": {"total_num_steps": 10}}))
    assert t.optimizer_class is shardopt.Muon
    assert t.is_muon
    assert t.optimizer_kwargs == {"lr": 0.02, "adamw_betas": (0.9, 0.95)}
    assert t.zero_kwargs == {"stage": 1, "max_grad_norm": 0.5, "matrix_layout": "whole", "bucket_numel": 1000,
                             "overlap": False, "precision": shardopt.PrecisionPolicy(reduce_dtype=torch.bfloat16)}
    # DeepSpeed keeps everything else, with its own clipping off and no shardopt section.
    assert t.deepspeed_config["gradient_clipping"] == 0.0
    assert t.deepspeed_config["gradient_accumulation_steps"] == 4
    assert "shardopt" not in t.deepspeed_config
    assert t.scheduler == {"type": "WarmupCosineLR", "params": {"total_num_steps": 10}}
    assert t.warnings == []


def test_clipping_follows_deepspeeds_default_and_zero_turns_it_off():
    assert translate(config()).zero_kwargs["max_grad_norm"] == dc.DEEPSPEED_GRADIENT_CLIPPING_DEFAULT == 1.0
    assert translate(config(gradient_clipping=0)).zero_kwargs["max_grad_norm"] is None
    with pytest.raises(ValueError, match=r"Invalid gradient_clipping: -1 \(expected a number >= 0"):
        translate(config(gradient_clipping=-1))


def test_defaults_are_zero_optimizers():
    t = translate(config())
    assert t.zero_kwargs == {"stage": 2, "max_grad_norm": 1.0}
    assert t.optimizer_class is shardopt.AdamW


@pytest.mark.parametrize(("value", "dtype"), [("fp32", torch.float32), ("bfloat16", torch.bfloat16),
                                              ("param", None)])
def test_reduce_dtype_names(value, dtype):
    t = translate(config(shardopt={"optimizer": ADAMW, "reduce_dtype": value}))
    assert t.zero_kwargs["precision"].reduce_dtype == dtype


def test_unknown_keys_are_one_warning_listing_them():
    t = translate(config(shardopt={"optimizer": {**ADAMW, "fused": True}, "offload": True, "stage3": 1}))
    assert len(t.warnings) == 1
    for key in ("shardopt.offload", "shardopt.stage3", "shardopt.optimizer.fused"):
        assert key in t.warnings[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dc.warn(t)
    assert len(caught) == 1
    assert "shardopt.offload" in str(caught[0].message)


@pytest.mark.parametrize(("extra", "message"), [
    ({"optimizer": {"type": "Adam"}}, r"Invalid config: a DeepSpeed 'optimizer' section .* delete the top-level"),
    ({"zero_optimization": {"stage": 1}}, r"Invalid zero_optimization.stage: 1 .* 'zero_optimization': \{'stage': 0\}"),
    ({"zero_optimization": {"stage": 3}}, r"Invalid zero_optimization.stage: 3"),
    ({"bf16": {"enabled": True}}, r"Invalid bf16: enabled .* 'bf16': \{'enabled': false\}.*reduce_dtype"),
    ({"fp16": {"enabled": True}}, r"Invalid fp16: enabled"),
    ({"torch_autocast": {"enabled": True, "dtype": "torch.float16"}}, r"Invalid torch_autocast: float16"),
    ({"managed_gradient_accumulation": False}, r"Invalid managed_gradient_accumulation: false"),
])
def test_silently_wrong_combinations_are_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        translate(config(**extra))


def test_harmless_neighbours_pass():
    t = translate(config(bf16={"enabled": False}, zero_optimization={"stage": 0},
                         torch_autocast={"enabled": True, "dtype": "bfloat16"}))
    assert t.deepspeed_config["bf16"] == {"enabled": False}


@pytest.mark.parametrize(("section", "message"), [
    ({"optimizer": {"type": "Sophia"}}, r"Invalid shardopt.optimizer.type: 'Sophia' \(expected one of"),
    ({}, r"Invalid shardopt.optimizer: None"),
    ({"optimizer": ADAMW, "stage": 3}, r"Invalid shardopt.stage: 3 \(expected 1 or 2"),
    ({"optimizer": ADAMW, "reduce_dtype": "fp16"}, r"Invalid shardopt.reduce_dtype: 'fp16' \(float16 needs loss"),
    ({"optimizer": ADAMW, "reduce_dtype": "int8"}, r"Invalid shardopt.reduce_dtype: 'int8' \(expected one of"),
    ({"optimizer": {"type": "AdamW", "params": [1]}}, r"Invalid shardopt.optimizer.params"),
])
def test_invalid_section_values(section, message):
    with pytest.raises(ValueError, match=message):
        translate(config(shardopt=section))


DEEPSPEED_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("deepspeed_*.json"))


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=[p.name for p in DEEPSPEED_CONFIGS])
def test_example_configs_translate_without_warnings(path):
    loaded = dc.load_config(path)  # a path, as deepspeed.initialize takes it
    t = translate(loaded)
    assert t.warnings == []
    assert t.zero_kwargs["stage"] == 2
    assert loaded["zero_optimization"]["stage"] == 0
    assert t.optimizer_class in (shardopt.Muon, shardopt.AdamW)


def test_example_configs_cover_adamw_and_muon():
    assert {p.name for p in DEEPSPEED_CONFIGS} >= {"deepspeed_adamw.json", "deepspeed_muon.json"}


def test_config_of_the_wrong_type():
    with pytest.raises(TypeError, match="Invalid config: list"):
        dc.load_config([1])


def test_scheduler_with_one_absolute_lr_for_groups_of_different_lrs_is_refused():
    groups = [0.02, 0.003]
    with pytest.raises(ValueError, match=r"Invalid scheduler.params.warmup_max_lr: 0.01 .* \[0.02, 0.003\]"):
        check_scheduler({"type": "WarmupLR", "params": {"warmup_max_lr": 0.01}}, groups)
    with pytest.raises(ValueError, match=r"warmup_max_lr: 0.001"):  # WarmupDecayLR's default is one number
        check_scheduler({"type": "WarmupDecayLR", "params": {"total_num_steps": 9}}, groups)
    with pytest.raises(ValueError, match=r"cycle_max_lr"):
        check_scheduler({"type": "OneCycle", "params": {"cycle_min_lr": 0, "cycle_max_lr": 0.1,
                                                         "cycle_momentum": False}}, groups)
    with pytest.raises(ValueError, match=r"cycle_momentum"):
        check_scheduler({"type": "OneCycle", "params": {}}, groups, is_muon=True, has_betas=True)
    # What maps: lists per group, WarmupLR's default (each group's lr), ratios, one group.
    check_scheduler({"type": "WarmupLR", "params": {"warmup_max_lr": [0.02, 0.003]}}, groups)
    check_scheduler({"type": "WarmupLR", "params": {}}, groups)
    check_scheduler({"type": "WarmupCosineLR", "params": {"total_num_steps": 9}}, groups)
    check_scheduler({"type": "WarmupLR", "params": {"warmup_max_lr": 0.01}}, [0.003, 0.003])
    check_scheduler(None, groups)


def test_rules_mode_refuses_muon_and_zero_optimizer_before_deepspeed_starts():
    from shardopt.integrations import deepspeed as plugin

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    muon = shardopt.Muon(shardopt.muon_param_groups(model), lr=0.02)
    zero1 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1}}
    with pytest.raises(ValueError, match=r"Invalid optimizer: Muon needs whole matrices.*ZeRO stage 1 .*plugin"):
        plugin.initialize(model=model, config=zero1, optimizer=muon)
    zero = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW)
    try:
        with pytest.raises(ValueError, match=r"Invalid optimizer: a ZeroOptimizer object .*'shardopt' section"):
            plugin.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1}, optimizer=zero)
    finally:
        zero.close()
    with pytest.raises(ValueError, match=r"Invalid optimizer: the config's 'shardopt' section builds"):
        plugin.initialize(model=model, config=config(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


# ---------------------------------------------------------------------- real DeepSpeed, 2 ranks


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ds_ckpt"))


@pytest.fixture(scope="module")
def job(root):
    from deepspeed_workers import main_job
    from dist_harness import run_ranks

    return run_ranks(main_job, 2, root, timeout=240)


@pytest.fixture(scope="module")
def resumed(job, root):
    from deepspeed_workers import resume_job
    from dist_harness import run_ranks

    return run_ranks(resume_job, 2, root, timeout=120)[0]


@needs_deepspeed
def test_plugin_equals_zero_optimizer_alone(job):
    from deepspeed_workers import CLIP, PLUGIN_CASES, STEPS

    for rank_out in job:
        for name, run in rank_out["plugin"].items():
            assert run["equal"], f"rank {rank_out['rank']} {name}: differs from ZeroOptimizer alone"
    runs = job[0]["plugin"]
    assert set(runs) == set(PLUGIN_CASES)
    for name, run in runs.items():
        _, _gas, clipping = PLUGIN_CASES[name]
        assert run["max_diff"] == 0.0, name
        assert run["global_steps"] == STEPS, name  # DeepSpeed stepped once per gas micro-batches
        expected_clip = 1.0 if clipping is None else CLIP
        assert run["max_grad_norm"] == expected_clip, name
        assert all(math.isfinite(n) for n in run["norms"]), name
        if clipping is not None:
            assert min(run["norms"]) > CLIP, (name, "clipping must act in every step")
    assert runs["muon-stage2-gas2"]["groups"] == 2  # Muon and its AdamW group
    assert runs["adamw-stage1-gas2"]["stage"] == 1


@needs_deepspeed
def test_deepspeed_issues_no_collective_of_its_own(job):
    for name, run in job[0]["plugin"].items():
        assert run["ds_collectives"] == {}, name
        # torch.distributed sees exactly ZeroOptimizer's collectives: those it issues without DeepSpeed.
        assert run["torch_collectives"] == run["oracle_collectives"], name
    control = job[0]["control"]  # the same counters around plain DeepSpeed see its gradient all-reduce
    assert control["ds_collectives"].get("all_reduce", 0) > 0
    assert control["torch_collectives"].get("all_reduce", 0) >= control["ds_collectives"]["all_reduce"]


@needs_deepspeed
def test_deepspeed_schedulers_drive_shardopts_learning_rate(job):
    from deepspeed_workers import SCHEDULERS

    assert set(job[0]["scheduler"]) == set(SCHEDULERS)
    for name, case in job[0]["scheduler"].items():
        assert case["plugin"] == case["reference"], name  # lr (and OneCycle's betas) per step, exactly
        assert len({lr for step in case["reference"] for lr, _ in step}) > 2, name  # the schedule moves
        assert case["equal"], f"{name}: the plugin's parameters differ from ZeroOptimizer given DeepSpeed's lrs"


@needs_deepspeed
def test_rules_mode_shardopt_adamw_equals_torch_adamw_under_deepspeed_zero(job):
    for rank_out in job:
        for stage in (1, 2, 3):
            assert rank_out["rules"][stage]["equal"], (rank_out["rank"], stage, rank_out["rules"][stage])
    assert "Muon needs whole matrices" in job[0]["muon_refused"]


@needs_deepspeed
def test_checkpoint_resumes_in_new_processes_bitwise(job, resumed):
    uninterrupted = job[0]["checkpoint"]
    assert uninterrupted["params"].keys() == resumed["params"].keys()
    assert resumed["loaded_steps"] == 10
    assert "step10" in Path(resumed["path"]).parts
    assert resumed["global_steps"] == uninterrupted["global_steps"] == 20
    assert resumed["lr"] == uninterrupted["lr"]  # the scheduler's state came back too
    for name, value in uninterrupted["params"].items():
        assert value.tobytes() == resumed["params"][name].tobytes(), name
