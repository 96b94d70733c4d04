"""Programs for test_checkpoint_dtensor.py: shardopt's optimizers on FSDP2 (``fully_shard``)
checkpointed through ``shardopt.checkpoint``, the same format as ZeroOptimizer's.

Two spawns at 2 ranks, each returning rank 0's full parameters (packed):

* :func:`save_runs`: shardopt.AdamW and shardopt.Muon (its AdamW group
  included) on FSDP2 train N steps, save, train N more: the uninterrupted runs.
  A ZeroOptimizer(AdamW) run does the same, for the way from ZeroOptimizer to FSDP2.
* :func:`resume_runs`, in new processes: fresh FSDP2 models and optimizers load
  the newest checkpoints and train N more; a ZeroOptimizer loads the FSDP2 AdamW
  checkpoint, and an FSDP2 shardopt.AdamW the ZeroOptimizer one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from checkpoint_workers import MUON_HP, N, pack
from torch import nn
from zero_workers import HP, TinyLM, batch, lm_loss, local

import shardopt
from shardopt import checkpoint

KINDS = ("adamw", "muon")


def optimizer_for(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "adamw":
        return shardopt.AdamW(model.parameters(), **HP)
    return shardopt.Muon(shardopt.muon_param_groups(model), **MUON_HP)


def fsdp_model(seed: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = TinyLM()
    fully_shard(model)
    return model


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int, world: int) -> None:
    for step in steps:
        lm_loss(model, local(batch(step), rank, world)).backward()
        opt.step()
        opt.zero_grad()


def full_params(model: nn.Module) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in model.parameters()]


def state_of(model: nn.Module, opt: Any) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": checkpoint.OptimizerState(model, opt)}


def _zero_adamw(seed: int) -> tuple[nn.Module, shardopt.ZeroOptimizer]:
    torch.manual_seed(seed)
    model = TinyLM()
    return model, shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, stage=2, bucket_numel=300, **HP)


def save_runs(rank: int, world: int, root: str) -> bytes:
    out: dict[str, Any] = {}
    for kind in KINDS:
        model = fsdp_model(seed=0)
        opt = optimizer_for(kind, model)
        train(model, opt, range(N), rank, world)
        checkpoint.save(state_of(model, opt), Path(root) / kind, N)
        train(model, opt, range(N, 2 * N), rank, world)
        out[kind] = full_params(model)
    model, zero = _zero_adamw(seed=0)
    train(model, zero, range(N), rank, world)
    checkpoint.save(state_of(model, zero), Path(root) / "zero", N)
    train(model, zero, range(N, 2 * N), rank, world)
    out["zero"] = full_params(model)
    return pack(out if rank == 0 else {})


def resume_runs(rank: int, world: int, root: str) -> bytes:
    out: dict[str, Any] = {}
    for kind in KINDS:
        model = fsdp_model(seed=123)
        opt = optimizer_for(kind, model)
        checkpoint.load(state_of(model, opt), checkpoint.latest(Path(root) / kind))
        out[f"{kind}/steps"] = sorted({float(s["step"]) for s in opt.state.values() if "step" in s})
        train(model, opt, range(N, 2 * N), rank, world)
        out[kind] = full_params(model)
    # FSDP2 + shardopt.AdamW -> ZeroOptimizer(AdamW), and back.
    model, zero = _zero_adamw(seed=123)
    checkpoint.load(state_of(model, zero), checkpoint.latest(Path(root) / "adamw"))
    train(model, zero, range(N, 2 * N), rank, world)
    out["adamw->zero"] = full_params(model)
    model = fsdp_model(seed=123)
    opt = optimizer_for("adamw", model)
    checkpoint.load(state_of(model, opt), checkpoint.latest(Path(root) / "zero"))
    train(model, opt, range(N, 2 * N), rank, world)
    out["zero->adamw"] = full_params(model)
    return pack(out if rank == 0 else {})
