"""Translate a DeepSpeed JSON config with a ``"shardopt"`` section: pure data, no DeepSpeed, no processes.

:func:`translate` turns the config into what
:func:`shardopt.integrations.deepspeed.initialize` needs: the config DeepSpeed
still sees, and the arguments of :class:`shardopt.ZeroOptimizer`. The section::

    "shardopt": {
        "optimizer": {"type": "Muon", "params": {"lr": 0.02, "adamw_lr": 3e-4}},
        "stage": 2,                    # ZeroOptimizer(stage=...): 1 or 2
        "matrix_layout": "balanced",   # or "whole" (Muon's matrices, see ZeroOptimizer)
        "reduce_dtype": "fp32",        # "bf16" halves gradient traffic; "param": the parameters' dtype
        "bucket_numel": 25000000,      # elements per communication bucket
        "overlap": true                # reduce buckets during backward
    }

What the rest of the config means for shardopt (DeepSpeed 0.19 semantics, read
from ``deepspeed/runtime/engine.py`` and ``deepspeed/runtime/constants.py``):

* ``gradient_clipping`` (DeepSpeed's default 1.0 when absent; 0 turns it off) becomes
  ``max_grad_norm``: the global norm over every rank's shard, clipped before the
  rule runs. DeepSpeed's own clipping is set to 0: at stage 0 it reads ``p.grad``,
  which ZeRO-2 frees.
* ``gradient_accumulation_steps`` stays DeepSpeed's (it divides the loss by it and
  steps on the boundary); the plugin keeps ZeroOptimizer from reducing off the
  boundary (its ``no_sync``).
* ``scheduler`` stays DeepSpeed's: its WarmupLR, WarmupDecayLR, WarmupCosineLR,
  OneCycle (and torch's schedulers) set ``lr`` in ZeroOptimizer's param groups,
  which its step reads. Where param groups start with different learning rates
  (Muon with its AdamW group), an absolute learning rate given as one number
  would set every group to it: refused by :func:`check_scheduler`, which asks for
  one value per group.
* ``train_batch_size``, ``train_micro_batch_size_per_gpu`` and their checks are
  DeepSpeed's, unchanged.

Refused, each with a ``ValueError`` saying what to write instead (every one
runs, silently wrong or crashing later, otherwise): a DeepSpeed ``"optimizer"``
section beside the shardopt one; ``zero_optimization.stage >= 1`` (DeepSpeed
would partition what ZeroOptimizer already shards); an enabled ``fp16`` or
``bf16`` section (DeepSpeed wraps the optimizer and steps its own fp32 copies,
discarding shardopt's updates); ``torch_autocast`` with float16 (its GradScaler
reads ``p.grad``); ``managed_gradient_accumulation: false`` (the accumulation
boundary is then only known inside ``engine.step()``, after the reduction
should have run).
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..muon_optimizer import Muon
from ..optimizers import SGD, Adagrad, Adam, AdamW, Lion, RMSprop
from ..zero.policy import PrecisionPolicy

SECTION = "shardopt"

# The names a config may give in "shardopt.optimizer.type" (matched without regard to case).
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": AdamW, "adam": Adam, "sgd": SGD, "adagrad": Adagrad, "rmsprop": RMSprop, "lion": Lion, "muon": Muon,
}
SECTION_KEYS = frozenset({"optimizer", "stage", "matrix_layout", "reduce_dtype", "bucket_numel", "overlap"})
OPTIMIZER_KEYS = frozenset({"type", "params"})
REDUCE_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "param": None,
}
# DeepSpeed's default when the config has no "gradient_clipping" (GRADIENT_CLIPPING_DEFAULT in its constants.py).
DEEPSPEED_GRADIENT_CLIPPING_DEFAULT = 1.0
# Scheduler keys that set an absolute learning rate (not a ratio of the group's own): DeepSpeed's
# lr_schedules.WarmupLR / WarmupDecayLR (warmup_*_lr) and OneCycle (cycle_*_lr).
ABSOLUTE_LR_KEYS: dict[str, tuple[str, ...]] = {
    "WarmupLR": ("warmup_min_lr", "warmup_max_lr"),
    "WarmupDecayLR": ("warmup_min_lr", "warmup_max_lr"),
    "OneCycle": ("cycle_min_lr", "cycle_max_lr"),
}
# Defaults DeepSpeed uses when such a key is absent: a default that is one number for every
# group is as wrong as a written one (WarmupLR's warmup_max_lr=None keeps each group's own lr).
ABSOLUTE_LR_DEFAULTS: dict[tuple[str, str], float | None] = {
    ("WarmupLR", "warmup_min_lr"): 0.0, ("WarmupLR", "warmup_max_lr"): None,
    ("WarmupDecayLR", "warmup_min_lr"): 0.0, ("WarmupDecayLR", "warmup_max_lr"): 0.001,
}


@dataclass
class Translation:
    """What :func:`translate` makes of a config.

    ``deepspeed_config`` is what ``deepspeed.initialize`` gets (a copy, without the
    shardopt section, ``gradient_clipping`` 0); ``optimizer_class`` and
    ``optimizer_kwargs`` the rule and its hyperparameters; ``zero_kwargs`` the rest
    of :class:`shardopt.ZeroOptimizer`'s arguments; ``warnings`` what was ignored.
    """

    deepspeed_config: dict[str, Any]
    optimizer_class: type[torch.optim.Optimizer]
    optimizer_kwargs: dict[str, Any]
    zero_kwargs: dict[str, Any]
    scheduler: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)

    @property
    def is_muon(self) -> bool:
        return self.optimizer_class is Muon


def load_config(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A deep copy of ``config`` (a dict, or the path of a JSON file, as ``deepspeed.initialize`` takes)."""
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    if not isinstance(config, Mapping):
        raise TypeError(f"Invalid config: {type(config).__name__} (expected a dict or the path of a DeepSpeed "
                        "JSON config)")
    return copy.deepcopy(dict(config))


def has_section(config: Mapping[str, Any]) -> bool:
    return SECTION in config


def deepspeed_zero_stage(config: Mapping[str, Any]) -> int:
    """``zero_optimization.stage`` of a DeepSpeed config (0 when absent, as DeepSpeed's default)."""
    zero = config.get("zero_optimization") or {}
    if not isinstance(zero, Mapping):
        raise ValueError(f"Invalid zero_optimization: {zero!r} (expected an object with a 'stage')")
    return int(zero.get("stage", 0))


def _enabled(config: Mapping[str, Any], key: str) -> bool:
    section = config.get(key)
    if section is None:
        return False
    if isinstance(section, Mapping):
        return bool(section.get("enabled", False))
    return bool(section)


def refuse_wrong_combinations(config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for each DeepSpeed setting that would run silently wrong around ZeroOptimizer."""
    if "optimizer" in config:
        raise ValueError(
            "Invalid config: a DeepSpeed 'optimizer' section and a 'shardopt' section both choose the optimizer; "
            "move its type and params into 'shardopt': {'optimizer': {'type': ..., 'params': {...}}} and delete "
            "the top-level 'optimizer'")
    stage = deepspeed_zero_stage(config)
    if stage >= 1:
        raise ValueError(
            f"Invalid zero_optimization.stage: {stage} together with a 'shardopt' section (DeepSpeed would "
            "partition what ZeroOptimizer already shards: stage 1 runs silently wrong, stage 3 crashes); write "
            "'zero_optimization': {'stage': 0} and choose the sharding with 'shardopt': {'stage': 1 or 2}")
    for key in ("fp16", "bf16", "bfloat16"):
        if _enabled(config, key):
            raise ValueError(
                f"Invalid {key}: enabled together with a 'shardopt' section (DeepSpeed wraps the optimizer and "
                "steps its own fp32 copies, discarding shardopt's updates); set '" + key + "': {'enabled': false}, "
                "cast the model yourself (model.to(torch.bfloat16): ZeroOptimizer keeps fp32 master weights and "
                "states) and choose the gradient dtype with 'shardopt': {'reduce_dtype': 'bf16'}")
    autocast = config.get("torch_autocast")
    if isinstance(autocast, Mapping) and autocast.get("enabled", False) and str(
            autocast.get("dtype", "")).removeprefix("torch.") in ("float16", "fp16", "half"):
        raise ValueError(
            "Invalid torch_autocast: float16 autocast with a 'shardopt' section (DeepSpeed's GradScaler reads "
            "p.grad, which ZeroOptimizer stage 2 frees, and float16 needs loss scaling, which ZeroOptimizer does "
            "not implement); use 'dtype': 'bfloat16' or disable torch_autocast")
    if config.get("managed_gradient_accumulation", True) is False:
        raise ValueError(
            "Invalid managed_gradient_accumulation: false with a 'shardopt' section (the accumulation boundary "
            "is then known only inside engine.step(), after ZeroOptimizer must have reduced the gradients "
            "during the last backward); remove the key and set gradient_accumulation_steps")


def _reduce_dtype(value: Any) -> torch.dtype | None:
    key = str(value).lower().removeprefix("torch.")
    if key in ("fp16", "float16", "half"):
        raise ValueError(f"Invalid shardopt.reduce_dtype: {value!r} (float16 needs loss scaling, which "
                         "ZeroOptimizer does not implement; 'bf16' costs the same bytes)")
    if key not in REDUCE_DTYPES:
        raise ValueError(f"Invalid shardopt.reduce_dtype: {value!r} (expected one of {sorted(REDUCE_DTYPES)})")
    return REDUCE_DTYPES[key]


def _max_grad_norm(config: Mapping[str, Any]) -> float | None:
    value = config.get("gradient_clipping", DEEPSPEED_GRADIENT_CLIPPING_DEFAULT)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
        raise ValueError(f"Invalid gradient_clipping: {value!r} (expected a number >= 0; 0 turns clipping off)")
    return float(value) if value > 0 else None


def translate(config: Mapping[str, Any]) -> Translation:
    """Check ``config`` and split it into DeepSpeed's part and ZeroOptimizer's arguments.

    Raises ``ValueError`` (see the module docstring) for wrong combinations and
    invalid values; unknown keys in the shardopt section (or in its
    ``optimizer``) are collected in ``Translation.warnings`` and warned about
    once, together.
    """
    config = copy.deepcopy(dict(config))
    section = config.pop(SECTION, None)
    if not isinstance(section, Mapping):
        raise ValueError(f"Invalid shardopt section: {section!r} (expected an object such as "
                         "{'optimizer': {'type': 'AdamW', 'params': {'lr': 3e-4}}, 'stage': 2})")
    refuse_wrong_combinations(config)
    unknown = [f"shardopt.{key}" for key in section if key not in SECTION_KEYS]
    optimizer = section.get("optimizer")
    if not isinstance(optimizer, Mapping) or "type" not in optimizer:
        raise ValueError(f"Invalid shardopt.optimizer: {optimizer!r} (expected {{'type': one of "
                         f"{sorted(OPTIMIZERS)}, 'params': {{...}}}})")
    unknown += [f"shardopt.optimizer.{key}" for key in optimizer if key not in OPTIMIZER_KEYS]
    name = str(optimizer["type"])
    if name.lower() not in OPTIMIZERS:
        raise ValueError(f"Invalid shardopt.optimizer.type: {name!r} (expected one of {sorted(OPTIMIZERS)}, "
                         "any case)")
    params = optimizer.get("params", {})
    if not isinstance(params, Mapping):
        raise ValueError(f"Invalid shardopt.optimizer.params: {params!r} (expected an object of hyperparameters)")
    kwargs = {key: tuple(value) if isinstance(value, list) else value for key, value in params.items()}
    stage = section.get("stage", 2)
    if stage not in (1, 2) or isinstance(stage, bool):
        raise ValueError(f"Invalid shardopt.stage: {stage!r} (expected 1 or 2; for no sharding leave out the "
                         "'shardopt' section and give DeepSpeed an optimizer)")
    zero_kwargs: dict[str, Any] = {"stage": stage, "max_grad_norm": _max_grad_norm(config)}
    if "matrix_layout" in section:
        zero_kwargs["matrix_layout"] = section["matrix_layout"]
    if "reduce_dtype" in section:
        zero_kwargs["precision"] = PrecisionPolicy(reduce_dtype=_reduce_dtype(section["reduce_dtype"]))
    if "bucket_numel" in section:
        zero_kwargs["bucket_numel"] = section["bucket_numel"]
    if "overlap" in section:
        zero_kwargs["overlap"] = section["overlap"]
    config["gradient_clipping"] = 0.0
    scheduler = config.get("scheduler")
    messages = []
    if unknown:
        messages.append(f"shardopt.integrations.deepspeed: ignoring unknown keys {unknown} (the shardopt "
                        f"section takes {sorted(SECTION_KEYS)}; its optimizer takes {sorted(OPTIMIZER_KEYS)})")
    return Translation(config, OPTIMIZERS[name.lower()], kwargs, zero_kwargs,
                       dict(scheduler) if isinstance(scheduler, Mapping) else None, messages)


def warn(translation: Translation) -> None:
    """Emit the translation's warnings, all in one."""
    if translation.warnings:
        warnings.warn("; ".join(translation.warnings), UserWarning, stacklevel=3)


def check_scheduler(scheduler: Mapping[str, Any] | None, group_lrs: Sequence[float],
                    group_names: Sequence[str] = (), *, has_betas: bool = True, is_muon: bool = False) -> None:
    """Refuse a DeepSpeed scheduler that would set every param group to one absolute learning rate
    although the groups start with different ones (Muon 0.02 and its AdamW group 3e-4).

    DeepSpeed's ``_format_param`` (``deepspeed/runtime/lr_schedules.py``) broadcasts a
    number to every group and accepts a list with one value per group;
    WarmupCosineLR scales each group's own ``lr`` and is always fine. Also refuses
    OneCycle's momentum cycling for Muon (it would write ``betas`` into the Muon group,
    whose momentum is ``momentum``).
    """
    if not scheduler:
        return
    kind = scheduler.get("type")
    params = scheduler.get("params") or {}
    if kind == "OneCycle" and is_muon and params.get("cycle_momentum", True) and has_betas:
        raise ValueError("Invalid scheduler.params.cycle_momentum: OneCycle cycles 'betas' of every group, "
                         "which Muon's groups do not use as their momentum; set 'cycle_momentum': false")
    distinct = len({float(lr) for lr in group_lrs}) > 1
    if not distinct:
        return
    labels = list(group_names) or [f"group {i}" for i in range(len(group_lrs))]
    for key in ABSOLUTE_LR_KEYS.get(kind, ()):
        value = params.get(key, ABSOLUTE_LR_DEFAULTS.get((kind, key)))
        if value is None or isinstance(value, (list, tuple)) or value == 0:
            continue  # per group, each group's own lr, or zero for all: all as meant
        example = [float(lr) for lr in group_lrs]
        raise ValueError(
            f"Invalid scheduler.params.{key}: {value!r} would set every param group to the same learning rate, "
            f"but the groups ({', '.join(labels)}) start at {example}; give one value per group, e.g. "
            f"'{key}': {example}" + (", or leave warmup_max_lr out (each group's own lr)" if kind == "WarmupLR"
                                     else "") + ", or use WarmupCosineLR (ratios of each group's lr)")
