"""Default settings at a size that needs several buckets: programs for test_defaults_at_scale.py.

``WideNet`` has about 9.7M parameters (six blocks of 8 x H and H x 8 matrices
with H near 90K), so the default ``bucket_numel`` (2**22 elements) cuts the
AdamW model into several storages and the Muon matrices into several all-gather
chunks per rank, and the odd sizes make an area boundary cut a matrix
(a straddler). Thin matrices keep Newton-Schulz cheap in the default bf16 on
a CPU (the Gram matrix is 8 x 8), so the default path runs at this size in
seconds. Every configuration runs twice from the same seed; rank 0 also runs
the single-process oracle on the whole batch.
"""

from __future__ import annotations

import os

import torch
from oracle import RankMeanOracle
from torch import nn

import shardopt

BATCH = 12  # divisible by 1, 2, 3 and 4
SEQ = 4
VOCAB = 64
WIDTH = 8
HIDDEN = tuple(80001 + 6007 * i for i in range(6))
STEPS = 3
MUON_HP = dict(lr=0.02, weight_decay=0.1, adamw_lr=3e-3)
ADAMW_HP = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)


class WideNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.ups = nn.ModuleList(nn.Linear(WIDTH, h) for h in HIDDEN)
        self.downs = nn.ModuleList(nn.Linear(h, WIDTH, bias=False) for h in HIDDEN)
        self.norm = nn.LayerNorm(WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for up, down in zip(self.ups, self.downs):
            h = h + down(torch.relu(up(self.norm(h)))) / 16
        return self.lm_head(self.norm(h))


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3000 + step))


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1]).float()
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _build(name: str, model: nn.Module, distributed: bool, **zero_kwargs):
    if name.startswith("muon"):
        groups = shardopt.muon_param_groups(model)
        if distributed:
            return shardopt.ZeroOptimizer(groups, shardopt.Muon, **zero_kwargs, **MUON_HP)
        return shardopt.Muon(groups, **MUON_HP)
    if distributed:
        return shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, **zero_kwargs, **ADAMW_HP)
    return torch.optim.AdamW(model.parameters(), **ADAMW_HP)


CONFIGS = {
    # name: (ZeroOptimizer keywords beyond the defaults, parameter dtype); stage 1 and
    # the whole layout run with small buckets in muon_workers and zero_workers.
    "adamw": ({}, torch.float32),
    "adamw-bf16-params": ({}, torch.bfloat16),
    "muon": ({}, torch.float32),
}


def _run(name: str, rank: int, world: int) -> tuple[list[torch.Tensor], shardopt.ZeroOptimizer]:
    kwargs, dtype = CONFIGS[name]
    torch.manual_seed(0)
    model = WideNet().to(dtype)
    opt = _build(name, model, True, **kwargs)
    for step in range(STEPS):
        loss_of(model, batch(step).chunk(world)[rank]).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], opt


def _oracle(name: str, world: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The unsharded optimizer on the whole batch, given exactly the gradients ZeroOptimizer
    averages and its master weights (``tests/oracle.py``)."""
    torch.manual_seed(0)
    oracle = RankMeanOracle(WideNet().to(dtype), lambda master: _build(name, master, False))
    for step in range(STEPS):
        oracle.step(list(batch(step).chunk(world)), loss_of)
    model = oracle.model
    return [p.detach() for p in model.parameters()]


def defaults(rank: int, world: int) -> dict[str, dict[str, object]]:
    out = {}
    # Two ranks: every configuration; three (uneven splits, two straddlers): Muon.
    for name in CONFIGS if world <= 2 else ["muon"]:
        first, opt = _run(name, rank, world)
        second, _ = _run(name, rank, world)
        result = {
            "rerun_diff": max((a.float() - b.float()).abs().max().item() for a, b in zip(first, second)),
            "digest": [p.double().sum().item() for p in first],
            "num_buckets": len(opt.plan.buckets),
            "num_storages": len(opt.plan.storages),
            "max_chunks": max(s.num_chunks for s in opt.plan.storages),
            "straddlers": len(opt.plan.straddlers),
            "skipped": opt.num_skipped_steps,
            "numel": sum(p.numel() for p in first),
        }
        if rank == 0:
            oracle = _oracle(name, world, CONFIGS[name][1])
            result["diff"] = max((a.float() - b.float()).abs().max().item() for a, b in zip(first, oracle))
            result["moved"] = max((a.float() - b).abs().max().item() for a, b in zip(oracle, _initial()))
        out[name] = result
        del opt
    return out


def _initial() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [p.detach() for p in WideNet().parameters()]


def suite(rank: int, world: int, programs: list[str]) -> dict[str, object]:
    # Every collective compared across ranks first (shardopt/comm.py): a rank issuing
    # another dtype or count than its peers raises instead of misreading bytes.
    os.environ["SHARDOPT_CHECK_COLLECTIVES"] = "1"
    return {name: globals()[name](rank, world) for name in programs}
