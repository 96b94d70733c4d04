"""Programs run on the spawned ranks by test_deepspeed.py (real DeepSpeed, gloo, CPU); each returns plain data.

The oracle of the plugin is ZeroOptimizer alone, without DeepSpeed, on the same
model, data and settings: accumulation through ``no_sync`` and the loss divided
by the accumulation steps, as DeepSpeed's ``engine.backward`` does.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from zero_workers import BATCH, TinyLM, batch, lm_loss, local

import shardopt
from shardopt.integrations import deepspeed as shardopt_ds

STEPS = 20
CLIP = 0.05  # below the gradient norms of TinyLM: clipping acts in every step
SCHEDULER_STEPS = 8

# DeepSpeed's comm layer and torch.distributed: the collectives counted.
COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "inference_all_reduce", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "reduce_scatter_single", "all_gather", "all_gather_into_tensor",
               "all_gather_single", "all_gather_coalesced", "all_to_all_single", "broadcast")

ADAMW = {"type": "AdamW", "params": {"lr": 0.01, "betas": [0.9, 0.95], "weight_decay": 0.1}}
MUON = {"type": "Muon", "params": {"lr": 0.02, "adamw_lr": 0.003, "weight_decay": 0.1}}

# name -> (shardopt section, gradient_accumulation_steps, gradient_clipping: None = DeepSpeed's default key absent)
PLUGIN_CASES: dict[str, tuple[dict[str, Any], int, float | None]] = {
    "adamw-stage2-gas1": ({"optimizer": ADAMW, "stage": 2, "bucket_numel": 300}, 1, CLIP),
    "adamw-stage1-gas2": ({"optimizer": ADAMW, "stage": 1, "bucket_numel": 200}, 2, CLIP),
    "muon-stage2-gas2": ({"optimizer": MUON, "stage": 2, "bucket_numel": 300}, 2, CLIP),
    "muon-whole-bf16reduce-gas1": ({"optimizer": MUON, "matrix_layout": "whole", "reduce_dtype": "bf16"}, 1, CLIP),
    # Nothing but the rule: ZeroOptimizer's defaults (stage 2, fp32 reduction, balanced layout, default
    # bucket) and Muon's (bf16 Newton-Schulz, lr 1e-3); no gradient_clipping key: DeepSpeed's 1.0.
    "muon-defaults-gas2": ({"optimizer": {"type": "muon"}}, 2, None),
}

SCHEDULERS: dict[str, dict[str, Any]] = {
    "WarmupLR": {"warmup_min_lr": 0.001, "warmup_max_lr": 0.01, "warmup_num_steps": 4, "warmup_type": "linear"},
    "WarmupDecayLR": {"total_num_steps": 8, "warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 3},
    "WarmupCosineLR": {"total_num_steps": 8, "warmup_num_steps": 3, "warmup_min_ratio": 0.1, "cos_min_ratio": 0.1},
    "OneCycle": {"cycle_min_lr": 0.001, "cycle_max_lr": 0.01, "cycle_first_step_size": 3, "cycle_min_mom": 0.85,
                 "cycle_max_mom": 0.95, "decay_lr_rate": 0.1},
}


def prepare(rank: int, world: int) -> None:
    """Environment DeepSpeed reads, and no JIT build: the process group already exists (gloo)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      DS_ACCELERATOR="cpu", TORCHDYNAMO_DISABLE="1")
    import logging

    import deepspeed
    import deepspeed.ops

    deepspeed.utils.logger.setLevel(logging.ERROR)
    # deepspeed.init_distributed JIT-builds its shared-memory op (about 50 s cold) when the op is
    # marked compatible; that op serves only inference_all_reduce (deepspeed/comm/torch.py), which
    # training never calls. DeepSpeed keeps this dict for the process, so the edit holds.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")


def ds_config(world: int, gas: int, clipping: float | None, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": BATCH // world, "gradient_accumulation_steps": gas,
        "steps_per_print": 1 << 30, "zero_optimization": {"stage": 0},
    }
    if clipping is not None:
        config["gradient_clipping"] = clipping
    config.update(extra)
    return config


def micro_batch(step: int, micro: int, gas: int, rank: int, world: int) -> torch.Tensor:
    return local(batch(step * gas + micro), rank, world)


def fresh_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TinyLM()


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@contextlib.contextmanager
def counting(target: Any) -> Iterator[Counter]:
    """Count calls of ``target``'s collective functions (a module or an object) inside the block."""
    counts: Counter = Counter()
    originals = {name: getattr(target, name) for name in COLLECTIVES if callable(getattr(target, name, None))}

    def counted(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return function(*args, **kwargs)

        return call

    for name, function in originals.items():
        setattr(target, name, counted(name, function))
    try:
        yield counts
    finally:
        for name, function in originals.items():
            setattr(target, name, function)


def cdb() -> Any:
    from deepspeed.comm import comm

    return comm.cdb


# ---------------------------------------------------------------------- the plugin against ZeroOptimizer alone


def plugin_run(rank: int, world: int, section: dict[str, Any], gas: int, clipping: float | None,
               steps: int = STEPS, **extra: Any) -> dict[str, Any]:
    model = fresh_model()
    config = ds_config(world, gas, clipping, shardopt=section, **extra)
    engine, opt, _, scheduler = shardopt_ds.initialize(model=model, config=config)
    norms, lrs = [], []
    with counting(cdb()) as ds_counts, counting(dist) as torch_counts:
        for step in range(steps):
            for micro in range(gas):
                engine.backward(lm_loss(engine, micro_batch(step, micro, gas, rank, world)))
                engine.step()
            norms.append(opt.last_grad_norm)
            lrs.append([g["lr"] for g in opt.param_groups])
    out = {"params": params_of(model), "norms": norms, "lrs": lrs, "ds_collectives": dict(ds_counts),
           "torch_collectives": dict(torch_counts), "global_steps": engine.global_steps,
           "max_grad_norm": opt.max_grad_norm, "stage": opt.stage, "groups": len(opt.param_groups),
           "scheduler": type(scheduler).__name__ if scheduler is not None else None}
    opt.close()
    return out


def oracle_run(rank: int, world: int, section: dict[str, Any], gas: int, clipping: float | None,
               steps: int = STEPS, lrs: list[list[float]] | None = None) -> dict[str, Any]:
    """ZeroOptimizer alone with the settings the plugin translates ``section`` to (written out here)."""
    from shardopt.integrations.deepspeed_config import OPTIMIZERS

    model = fresh_model()
    kind = section["optimizer"]["type"].lower()
    hp = {k: tuple(v) if isinstance(v, list) else v for k, v in section["optimizer"].get("params", {}).items()}
    params = shardopt.muon_param_groups(model) if kind == "muon" else list(model.named_parameters())
    zero: dict[str, Any] = {"stage": section.get("stage", 2),
                            "max_grad_norm": 1.0 if clipping is None else clipping}
    if "bucket_numel" in section:
        zero["bucket_numel"] = section["bucket_numel"]
    if "matrix_layout" in section:
        zero["matrix_layout"] = section["matrix_layout"]
    if section.get("reduce_dtype") == "bf16":
        zero["precision"] = shardopt.PrecisionPolicy(reduce_dtype=torch.bfloat16)
    opt = shardopt.ZeroOptimizer(params, OPTIMIZERS[kind], **zero, **hp)
    with counting(dist) as torch_counts:
        for step in range(steps):
            if lrs is not None:
                for group, lr in zip(opt.param_groups, lrs[step]):
                    group["lr"] = lr
            for micro in range(gas):
                loss = lm_loss(model, micro_batch(step, micro, gas, rank, world)) / gas
                with opt.no_sync() if micro < gas - 1 else contextlib.nullcontext():
                    loss.backward()
            opt.step()
            opt.zero_grad()
    out = {"params": params_of(model), "torch_collectives": dict(torch_counts)}
    opt.close()
    return out


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {"equal": all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys(),
            "max_diff": max(float((a[k] - b[k]).abs().max()) for k in a)}


def deepspeed_control(rank: int, world: int) -> dict[str, Any]:
    """Plain DeepSpeed (stage 0, torch AdamW): the counters do see its gradient all-reduce."""
    import deepspeed

    model = fresh_model()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
                                           config=ds_config(world, 1, 0.0))
    with counting(cdb()) as ds_counts, counting(dist) as torch_counts:
        for step in range(2):
            engine.backward(lm_loss(engine, micro_batch(step, 0, 1, rank, world)))
            engine.step()
    return {"ds_collectives": dict(ds_counts), "torch_collectives": dict(torch_counts)}


# ---------------------------------------------------------------------- schedulers


def scheduler_case(rank: int, world: int, name: str) -> dict[str, Any]:
    """DeepSpeed's scheduler on torch AdamW (its own engine), through the plugin, and the oracle
    ZeroOptimizer alone given DeepSpeed's learning rates step by step."""
    import deepspeed

    scheduler = {"type": name, "params": SCHEDULERS[name]}
    model = fresh_model()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.9, 0.95)),
        config=ds_config(world, 1, 0.0, scheduler=scheduler))
    reference = []
    for step in range(SCHEDULER_STEPS):
        reference.append([(g["lr"], tuple(g["betas"])) for g in engine.optimizer.param_groups])
        engine.backward(lm_loss(engine, micro_batch(step, 0, 1, rank, world)))
        engine.step()
    section = {"optimizer": ADAMW, "bucket_numel": 300}
    model = fresh_model()
    engine, opt, _, _ = shardopt_ds.initialize(model=model, config=ds_config(world, 1, 0.0, shardopt=section,
                                                                              scheduler=scheduler))
    seen = []
    for step in range(SCHEDULER_STEPS):
        seen.append([(g["lr"], tuple(g["betas"])) for g in opt.param_groups])
        engine.backward(lm_loss(engine, micro_batch(step, 0, 1, rank, world)))
        engine.step()
    plugin = params_of(model)
    opt.close()
    # The oracle gets DeepSpeed's torch-AdamW schedule, lr and betas, written into its groups.
    model = fresh_model()
    oracle = shardopt.ZeroOptimizer(list(model.named_parameters()), shardopt.AdamW, bucket_numel=300,
                                    lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(SCHEDULER_STEPS):
        for group, (lr, betas) in zip(oracle.param_groups, reference[step]):
            group["lr"], group["betas"] = lr, betas
        lm_loss(model, micro_batch(step, 0, 1, rank, world)).backward()
        oracle.step()
        oracle.zero_grad()
    oracle.close()
    return {"reference": reference, "plugin": seen, **compare(plugin, params_of(model))}


# ---------------------------------------------------------------------- rules mode


def rules_mode(rank: int, world: int, stage: int) -> dict[str, Any]:
    """shardopt.AdamW and torch.optim.AdamW as client optimizers under DeepSpeed ZeRO ``stage``."""
    import deepspeed

    finals = {}
    for label, cls in (("shardopt", shardopt.AdamW), ("torch", torch.optim.AdamW)):
        model = fresh_model()
        config = ds_config(world, 1, 0.0, zero_optimization={"stage": stage}, zero_allow_untested_optimizer=True)
        engine, _, _, _ = shardopt_ds.initialize(
            model=model, config=config, optimizer=cls(model.parameters(), lr=0.01, betas=(0.9, 0.95),
                                                      weight_decay=0.1))
        for step in range(4):
            engine.backward(lm_loss(engine, micro_batch(step, 0, 1, rank, world)))
            engine.step()
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):  # whole parameters at ZeRO-3; nothing to do at 1-2
            finals[label] = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
        engine.destroy()
    return compare(finals["shardopt"], finals["torch"])


def muon_under_deepspeed_zero(rank: int, world: int) -> str:
    """The plugin's rules mode refuses shardopt.Muon under DeepSpeed ZeRO-1 (before DeepSpeed starts)."""
    model = fresh_model()
    config = ds_config(world, 1, 0.0, zero_optimization={"stage": 1}, zero_allow_untested_optimizer=True)
    try:
        shardopt_ds.initialize(model=model, config=config,
                               optimizer=shardopt.Muon(shardopt.muon_param_groups(model), lr=0.02))
    except ValueError as error:
        return str(error)
    return "no error"


# ---------------------------------------------------------------------- checkpoints

CKPT_SECTION = {"optimizer": MUON, "stage": 2, "bucket_numel": 300}
CKPT_SCHEDULER = {"type": "WarmupCosineLR", "params": {"total_num_steps": 20, "warmup_num_steps": 4}}
CKPT_GAS = 2


def checkpoint_engine(world: int, seed: int) -> tuple[torch.nn.Module, Any, Any]:
    model = fresh_model(seed)
    config = ds_config(world, CKPT_GAS, CLIP, shardopt=CKPT_SECTION, scheduler=CKPT_SCHEDULER)
    engine, opt, _, _ = shardopt_ds.initialize(model=model, config=config)
    return model, engine, opt


def train_steps(engine: Any, rank: int, world: int, steps: range) -> None:
    for step in steps:
        for micro in range(CKPT_GAS):
            engine.backward(lm_loss(engine, micro_batch(step, micro, CKPT_GAS, rank, world)))
            engine.step()


def checkpoint_save(rank: int, world: int, root: str) -> dict[str, Any]:
    """Train 10 steps, engine.save_checkpoint, train 10 more: the uninterrupted run."""
    model, engine, opt = checkpoint_engine(world, 0)
    train_steps(engine, rank, world, range(10))
    engine.save_checkpoint(root, tag="step10")
    train_steps(engine, rank, world, range(10, 20))
    out = {"params": params_of(model), "lr": [g["lr"] for g in opt.param_groups], "global_steps": engine.global_steps}
    opt.close()
    return out


def checkpoint_resume(rank: int, world: int, root: str) -> dict[str, Any]:
    """New processes, another initialisation: engine.load_checkpoint (tag from 'latest'), train 10 steps."""
    model, engine, opt = checkpoint_engine(world, 1)
    path, _ = engine.load_checkpoint(root)
    loaded_steps = engine.global_steps
    train_steps(engine, rank, world, range(10, 20))
    out = {"params": params_of(model), "lr": [g["lr"] for g in opt.param_groups], "global_steps": engine.global_steps,
           "loaded_steps": loaded_steps, "path": str(path)}
    opt.close()
    return out


# ---------------------------------------------------------------------- the jobs


def as_arrays(params: dict[str, torch.Tensor]) -> dict[str, Any]:
    # numpy copies pickle by value; torch's queue would pass tensors as shared memory, gone with the rank.
    return {name: value.numpy().copy() for name, value in params.items()}


def main_job(rank: int, world: int, root: str) -> dict[str, Any]:
    prepare(rank, world)
    out: dict[str, Any] = {"plugin": {}, "scheduler": {}, "rules": {}}
    for name, (section, gas, clipping) in PLUGIN_CASES.items():
        run = plugin_run(rank, world, section, gas, clipping)
        oracle = oracle_run(rank, world, section, gas, clipping)
        run.update(compare(run.pop("params"), oracle["params"]), oracle_collectives=oracle["torch_collectives"])
        out["plugin"][name] = run
    out["control"] = deepspeed_control(rank, world)
    for name in SCHEDULERS:
        out["scheduler"][name] = scheduler_case(rank, world, name)
    for stage in (1, 2, 3):
        out["rules"][stage] = rules_mode(rank, world, stage)
    out["muon_refused"] = muon_under_deepspeed_zero(rank, world)
    checkpoint = checkpoint_save(rank, world, root)
    out["checkpoint"] = {**checkpoint, "params": as_arrays(checkpoint["params"])}
    return {"rank": rank, **out}


def resume_job(rank: int, world: int, root: str) -> dict[str, Any]:
    prepare(rank, world)
    out = checkpoint_resume(rank, world, root)
    return {"rank": rank, **out, "params": as_arrays(out["params"])}
