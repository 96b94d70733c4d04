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
    """New processes at 2 ranks: every config from its world-2 checkpoint, reshard 3 -> 2, and
    :func:`interop` with FSDP2 + torch.optim."""
    return pack({"from2@2": resume(rank, world, root, [*CONFIGS, "default"], 2),
                 "from3@2": resume(rank, world, root, RESHARD, 3),
                 "interop": interop(rank, world, root), "memory": memory(rank, world, root)})


def pack(out: dict[str, object]) -> bytes:
    """``torch.save`` bytes: tensors sent through the queue as they are would be shared-memory
    handles that die with the process."""
    buffer = io.BytesIO()
    torch.save(out, buffer)
    return buffer.getvalue()


def results(payload: bytes) -> dict[str, object]:
    return torch.load(io.BytesIO(payload), weights_only=False)


def _fsdp(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """TinyLM under torch's FSDP2 (``fully_shard``: ``Shard(0)`` DTensor parameters) + torch.optim.AdamW."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = TinyLM()
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), **HP)


def _torch_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, object]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def _full_params(model: nn.Module) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in model.parameters()]


def _train_any(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int, world: int) -> None:
    for step in steps:
        lm_loss(model, local(batch(step), rank, world)).backward()
        opt.step()
        opt.zero_grad()


def interop(rank: int, world: int, root: str) -> dict[str, object]:
    """ZeroOptimizer(AdamW) -> FSDP2 + torch.optim.AdamW and back, each continued N steps and
    compared with the uninterrupted run of the saving side (rank 0's full parameters)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    out: dict[str, object] = {}
    zero_root, torch_root = Path(root) / "interop-zero", Path(root) / "interop-fsdp2"
    # shardopt saves, FSDP2 + torch.optim resumes.
    model, opt = build("adamw/stage2")
    train(model, opt, "adamw/stage2", range(N), rank, world)
    checkpoint.save(state_of(model, opt), zero_root, N)
    train(model, opt, "adamw/stage2", range(N, 2 * N), rank, world)
    out["zero"] = _full_params(model)
    fsdp, torch_opt = _fsdp(seed=123)
    state = _torch_state(fsdp, torch_opt)
    dcp.load(state, checkpoint_id=str(checkpoint.latest(zero_root)))
    set_model_state_dict(fsdp, state["model"])
    set_optimizer_state_dict(fsdp, torch_opt, state["optim"])
    out["zero->fsdp2/step"] = [float(s["step"]) for s in torch_opt.state.values()]
    _train_any(fsdp, torch_opt, range(N, 2 * N), rank, world)
    out["zero->fsdp2"] = _full_params(fsdp)
    # FSDP2 + torch.optim saves (torch's functions), shardopt resumes through checkpoint.load.
    fsdp, torch_opt = _fsdp(seed=0)
    _train_any(fsdp, torch_opt, range(N), rank, world)
    checkpoint.save(_torch_state(fsdp, torch_opt), torch_root, N)
    _train_any(fsdp, torch_opt, range(N, 2 * N), rank, world)
    out["fsdp2"] = _full_params(fsdp)
    for config in ("adamw/stage1", "adamw/stage2"):
        model, opt = build(config, seed=123)
        checkpoint.load(state_of(model, opt), checkpoint.latest(torch_root))
        train(model, opt, config, range(N, 2 * N), rank, world)
        out[f"fsdp2->{config}"] = _full_params(model)
    return out


def _area_bytes(opt: shardopt.ZeroOptimizer) -> int:
    """Bytes of this rank's areas: its pieces of every state and of the fp32 master weights."""
    total = 0
    for buffers in opt.sharded_state().storages:
        total += sum(t.numel() * t.element_size() for t in buffers.states.values() if t.dim())
        if buffers.master_separate():
            total += buffers.master.numel() * buffers.master.element_size()
    return total


def memory(rank: int, world: int, root: str) -> dict[str, int]:
    """Peak bytes that ``checkpoint.save`` and ``checkpoint.load`` allocate beyond what exists (torch's
    CPU allocator events under the profiler, tests/test_matrix_workspace.py's method), next to this
    rank's area bytes and the largest parameter's bytes."""
    from test_matrix_workspace import allocation_peak

    def build_big(seed: int) -> tuple[nn.Module, shardopt.ZeroOptimizer]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(256, 384), nn.Linear(384, 256), nn.Linear(256, 64))
        return model, shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, bucket_numel=50_000, **HP)

    model, opt = build_big(0)
    for step in range(2):
        torch.manual_seed(step)
        model(torch.randn(8, 256)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    where = Path(root) / "memory"
    save_peak, _ = allocation_peak(lambda: checkpoint.save(state_of(model, opt), where, 2))
    other, other_opt = build_big(1)
    state = state_of(other, other_opt)
    checkpoint.get_optimizer_state_dict(other, other_opt)  # allocates the states outside the window
    load_peak, _ = allocation_peak(lambda: checkpoint.load(state, checkpoint.latest(where)))
    equal = all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    return {"save": save_peak, "load": load_peak, "area": _area_bytes(opt), "equal": equal,
            "largest_param": max(p.numel() * p.element_size() for p in model.parameters())}
