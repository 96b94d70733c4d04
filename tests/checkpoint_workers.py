"""Programs for test_checkpoint_dcp.py, run on every spawned rank; each returns plain data.

Two spawns (a spawn costs seconds), :func:`chain` on 4 ranks and :func:`fresh` on 2:

* ``save``: every config trains N steps, saves (DCP, through
  ``shardopt.checkpoint.save``; one config with ``async_save``), trains N more
  and reports rank 0's parameters and full state: the uninterrupted run.
* ``resume``: a new model and optimizer load the newest complete checkpoint,
  train N more and report the same quantities.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from zero_workers import HP, TinyLM, batch, lm_loss, local

import shardopt
from shardopt import checkpoint

N = 3
MUON_HP = dict(lr=0.02, ns_dtype="float32", adamw_lr=0.01)
CONFIGS = ["adamw/stage1", "adamw/stage2", "muon/stage1", "muon/stage2"]
RESHARD = ["adamw/stage2", "muon/stage2"]
ASYNC = "adamw/stage1"  # saved with dcp.async_save


def build(config: str, seed: int = 0, group: Any = None) -> tuple[nn.Module, shardopt.ZeroOptimizer]:
    """A fresh model and optimizer for ``config``: ``rule/stageS`` (fp32, small buckets) or
    ``default`` (bf16 parameters, the default precision policy and bucket size, Muon)."""
    torch.manual_seed(seed)
    if config == "default":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
        from gpt_model import GPT, GPTConfig

        model = GPT(GPTConfig(seq_len=16, num_layers=1, num_heads=4, hidden=128)).to(torch.bfloat16)
        return model, shardopt.ZeroOptimizer(shardopt.muon_param_groups(model), shardopt.Muon, lr=0.02,
                                             process_group=group)
    rule, stage = config.split("/")
    model = TinyLM()
    if rule == "adamw":
        opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, stage=int(stage[-1]), bucket_numel=300,
                                     process_group=group, **HP)
    else:
        opt = shardopt.ZeroOptimizer(shardopt.muon_param_groups(model), shardopt.Muon, stage=int(stage[-1]),
                                     bucket_numel=300, process_group=group, **MUON_HP)
    return model, opt


def train(model: nn.Module, opt: shardopt.ZeroOptimizer, config: str, steps: range, rank: int, world: int) -> None:
    for step in steps:
        if config == "default":
            gen = torch.Generator().manual_seed(step)
            tokens = torch.randint(0, 256, (12, 17), generator=gen)
            model.loss(local(tokens, rank, world)).backward()
        else:
            lm_loss(model, local(batch(step), rank, world)).backward()
        opt.step()
        opt.zero_grad()


def report(model: nn.Module, opt: shardopt.ZeroOptimizer) -> dict[str, object]:
    """Rank 0's parameters and full optimizer state (``None`` elsewhere), plus the skip counter."""
    full = opt.full_state_dict()
    params = [p.detach().clone() for p in model.parameters()]
    return {"params": params if full is not None else None, "state": full,
            "num_skipped_steps": opt.num_skipped_steps}


def state_of(model: nn.Module, opt: shardopt.ZeroOptimizer) -> dict[str, object]:
    return {"model": model.state_dict(), "optim": checkpoint.OptimizerState(model, opt)}


def save(rank: int, world: int, root: str, configs: list[str], group: Any = None) -> dict[str, object]:
    """Train N, save at step N, train N more: the uninterrupted run of every config."""
    out: dict[str, object] = {}
    for config in configs:
        model, opt = build(config, group=group)
        train(model, opt, config, range(N), rank, world)
        if config == "default":
            out["default/buckets"] = len(opt.plan.buckets)
            out["default/straddlers"] = len(opt.plan.straddlers)
            out["default/master_separate"] = any(s.master_separate() for s in opt.storages)
        opt.num_skipped_steps = 7  # a counter the checkpoint must carry
        where = Path(root) / f"w{world}" / config.replace("/", "-")
        if config == ASYNC:
            future = checkpoint.save(state_of(model, opt), where, N, async_save=True, process_group=group)
            out["async_path"] = str(future.result(timeout=60))
            dist.barrier(group)
        else:
            checkpoint.save(state_of(model, opt), where, N, process_group=group)
        if config == "adamw/stage2":
            out["full_at_save"] = opt.full_state_dict()
        train(model, opt, config, range(N, 2 * N), rank, world)
        out[config] = report(model, opt)
    return out


def resume(rank: int, world: int, root: str, configs: list[str], saved_world: int,
           group: Any = None) -> dict[str, object]:
    """New model and optimizer (another seed: nothing may survive but the checkpoint), load the
    newest complete checkpoint saved at ``saved_world`` ranks, train N more."""
    out: dict[str, object] = {}
    for config in configs:
        model, opt = build(config, seed=123, group=group)
        path = checkpoint.latest(Path(root) / f"w{saved_world}" / config.replace("/", "-"))
        checkpoint.load(state_of(model, opt), path, process_group=group)
        out[f"{config}/step"] = checkpoint.step_of(path)
        train(model, opt, config, range(N, 2 * N), rank, world)
        out[config] = report(model, opt)
    return out


def chain(rank: int, world: int, root: str) -> bytes:
    """On 4 ranks: save at 2 (ranks 0-1), load that at 3 (ranks 0-2) and save there, load that at 4.

    Sub-groups instead of one spawn per world size: a spawn costs seconds.
    Resharding needs no new processes (new models and optimizers, another
    seed); bitwise resume in new processes is :func:`fresh`'s.
    """
    two, three = dist.new_group([0, 1]), dist.new_group([0, 1, 2])
    out: dict[str, object] = {}
    if rank < 2:
        out["save@2"] = save(rank, 2, root, [*CONFIGS, "default"], two)
    if rank < 3:
        out["from2@3"] = resume(rank, 3, root, RESHARD, 2, three)
        out["save@3"] = save(rank, 3, root, RESHARD, three)
    out["from3@4"] = resume(rank, 4, root, RESHARD, 3)
    return pack(out)


def fresh(rank: int, world: int, root: str) -> bytes:
    """New processes at 2 ranks: every config from its world-2 checkpoint, and reshard 3 -> 2."""
    return pack({"from2@2": resume(rank, world, root, [*CONFIGS, "default"], 2),
                 "from3@2": resume(rank, world, root, RESHARD, 3)})


def pack(out: dict[str, object]) -> bytes:
    """``torch.save`` bytes: tensors sent through the queue as they are would be shared-memory
    handles that die with the process."""
    buffer = io.BytesIO()
    torch.save(out, buffer)
    return buffer.getvalue()


def results(payload: bytes) -> dict[str, object]:
    return torch.load(io.BytesIO(payload), weights_only=False)
