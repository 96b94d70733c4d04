"""Programs run on every spawned rank by test_gather_overlap.py (``overlap_gather``).

Each runs the same model twice in lockstep, the parameter all-gathers waited
for in ``step()`` (``overlap_gather=False``) and deferred to the next forward
(``True``), and reports whether the two hold the same bits, with the number of
all-gathers pending at each point.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from zero_workers import HP, TinyLM, batch, lm_loss, local

import shardopt

STEPS = 1  # before the entry points, each of which follows one more step: 6 in all
MUON_HP = dict(lr=0.02, ns_dtype="float32", adamw_lr=0.01)


def num_global_pre_hooks() -> int:
    return len(torch_module._global_forward_pre_hooks)


def _tiny(kind: str, stage: int, overlap: bool) -> tuple[nn.Module, shardopt.ZeroOptimizer]:
    torch.manual_seed(0)
    model = TinyLM()
    if kind == "adamw":
        opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, stage=stage, bucket_numel=300,
                                     overlap_gather=overlap, **HP)
    else:
        opt = shardopt.ZeroOptimizer(shardopt.muon_param_groups(model), shardopt.Muon, stage=stage,
                                     bucket_numel=300, overlap_gather=overlap, **MUON_HP)
    return model, opt


def same(a: Any, b: Any) -> bool:
    """Equal bit for bit: tensors by torch.equal (dtype and shape included), containers item by item."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def tiny_lm(rank: int, world: int, kind: str, stage: int) -> dict[str, object]:
    """TinyLM in lockstep without and with ``overlap_gather``, each rank on its slice of the batch.

    Each entry point that must wait for the pending all-gathers is called right
    after a ``step()`` of both runs: ``state_dict()``, ``load_state_dict()``,
    ``full_state_dict()``, ``wait_for_params()`` and ``close()``.
    """
    off_model, off = _tiny(kind, stage, overlap=False)
    on_model, on = _tiny(kind, stage, overlap=True)
    hooks = num_global_pre_hooks()
    out: dict[str, Any] = {"buckets": len(on.plan.buckets), "pending_after_step": [], "pending_after_forward": [],
                           "hooks_after_forward": [], "losses_equal": True, "pending_off": []}
    step = 0

    def train(count: int) -> None:
        nonlocal step
        for _ in range(count):
            tokens = local(batch(step), rank, world)
            off_loss = lm_loss(off_model, tokens)
            on_loss = lm_loss(on_model, tokens)  # its modules' pre-hooks wait for the gathers
            out["pending_after_forward"].append(on.param_gather.num_pending)
            out["hooks_after_forward"].append(num_global_pre_hooks() - hooks)
            out["losses_equal"] &= torch.equal(off_loss, on_loss)
            for opt, loss in ((off, off_loss), (on, on_loss)):
                loss.backward()
                opt.step()
                opt.zero_grad()
            out["pending_after_step"].append(on.param_gather.num_pending)
            out["pending_off"].append(off.param_gather.num_pending)
            step += 1

    def entry_point(name: str, call: Callable[[shardopt.ZeroOptimizer], Any]) -> tuple[Any, Any]:
        """``call`` on both optimizers right after a step; the pending counts before and after."""
        train(1)
        before = on.param_gather.num_pending
        results = call(off), call(on)
        out[name] = {"pending_before": before, "pending_after": on.param_gather.num_pending,
                     "hooks_after": num_global_pre_hooks() - hooks}
        return results

    train(STEPS)
    off_sd, on_sd = entry_point("state_dict", lambda opt: opt.state_dict())
    out["state_dict"]["equal"] = same(off_sd, on_sd)
    # The overlapped optimizer loads the other's state: equal states keep the runs equal.
    entry_point("load_state_dict", lambda opt: opt.load_state_dict(off.state_dict()) if opt is on else None)
    off_full, on_full = entry_point("full_state_dict", lambda opt: opt.full_state_dict())
    out["full_state_dict"]["equal"] = same(off_full, on_full)
    entry_point("wait_for_params", lambda opt: opt.wait_for_params())
    out["wait_for_params"]["params_equal"] = same_params(off_model, on_model)
    entry_point("close", lambda opt: opt.close())
    out["close"]["params_equal"] = same_params(off_model, on_model)
    return out


class Stack(nn.Module):
    """About 2.1M parameters in eight 512x512 layers: with buckets of two layers, four buckets."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(512, 512, bias=False) for _ in range(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return x


def stack_data(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3000 + step)
    x, y = torch.randn(2, 12, 512, generator=gen)
    return x.chunk(world)[rank], y.chunk(world)[rank]


def default_config(rank: int, world: int, steps: int = 2) -> dict[str, object]:
    """Stage 2 AdamW with defaults, buckets of two layers: two runs with ``overlap_gather`` give
    the same bits, equal to a run without; a layer's forward waits for its bucket and the
    ones launched before it, not more."""
    runs, out = [], {}
    for overlap in (True, True, False):
        torch.manual_seed(0)
        model = Stack()
        opt = shardopt.ZeroOptimizer(model.parameters(), bucket_numel=600_000, overlap_gather=overlap, lr=1e-3)
        for step in range(steps):
            x, y = stack_data(step, rank, world)
            if overlap and step == steps - 1 and not runs:
                # Each layer's forward waits for the buckets up to its own, in forward order.
                waited = [opt.param_gather.num_pending]
                h = x
                for layer in model.layers:
                    h = h + torch.tanh(layer(h))
                    waited.append(opt.param_gather.num_pending)
                out["pending_by_layer"] = waited
            (model(x) - y).square().mean().backward()
            opt.step()
            opt.zero_grad()
        out["buckets"] = len(opt.plan.buckets)
        opt.wait_for_params()
        runs.append(model)
    out["rerun_equal"] = same_params(runs[0], runs[1])
    out["equal_to_off"] = same_params(runs[0], runs[2])
    return out


def suite(rank: int, world: int) -> dict[str, object]:
    """Every program, in one spawn per world size."""
    # Every collective compared across ranks first (shardopt/comm.py): the launch order
    # must be the same on every rank. It doubles the run time, so at two ranks only.
    if world <= 2:
        os.environ["SHARDOPT_CHECK_COLLECTIVES"] = "1"
    out: dict[str, object] = {"default_config": default_config(rank, world)}
    for kind in ("adamw", "muon"):
        for stage in (1, 2) if world <= 2 else (2,):  # three ranks: stage 2, the uneven areas
            out[f"{kind}/stage{stage}"] = tiny_lm(rank, world, kind, stage)
    return out
