"""Distributed Muon programs run on every spawned rank by test_muon_dist.py.

Each compares ZeroOptimizer(shardopt.Muon) on this rank's slice of the batch
with the single-process shardopt.Muon (with its AdamW group) on the whole batch
in the same process: the oracle.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import shardopt
from shardopt.rules.muon import count_orthogonalized

BATCH = 24  # divisible by world sizes 1, 2, 3 and 4
SEQ = 6
VOCAB = 19
HP = dict(lr=0.02, ns_dtype="float32", weight_decay=0.05, adamw_lr=0.01)
STEPS = 20


class MuonNet(nn.Module):
    """Square, tall and wide matrices, a same-shape group, an expert stack, a conv
    kernel, and the parameters Muon leaves to AdamW: embedding, head, norm, biases."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.norm = nn.LayerNorm(16)
        self.q = nn.Linear(16, 16, bias=False)  # q, k, v: three square 16x16
        self.k = nn.Linear(16, 16, bias=False)
        self.v = nn.Linear(16, 16, bias=False)
        self.up = nn.Linear(16, 37)  # weight 37x16: tall (odd sizes: areas cut matrices)
        self.down = nn.Linear(37, 16)  # weight 16x37: wide
        self.experts = nn.Parameter(torch.randn(3, 8, 16) / 4)  # three 8x16 matrices
        self.mix = nn.Linear(8, 16, bias=False)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)  # a 4x36 matrix
        self.branch = nn.Linear(16, 16, bias=False)  # used on some ranks only
        self.lm_head = nn.Linear(16, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor, use_branch: bool = False) -> torch.Tensor:
        h = self.norm(self.embed(tokens))
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 4, dim=-1)
        h = h + att @ self.v(h)
        h = h + self.down(torch.relu(self.up(h)))
        h = h + self.mix(torch.einsum("btd,erd->btr", h, self.experts).relu())
        b, t, _ = h.shape
        h = h + self.conv(h.reshape(b * t, 4, 2, 2)).reshape(b, t, 16)
        if use_branch:
            h = h + self.branch(h)
        return self.lm_head(h)


NUM_MATRICES = 3 + 2 + 3 + 1 + 1 + 1  # q k v, up down, 3 experts, mix, conv, branch


def batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2000 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)


def loss_of(model: nn.Module, tokens: torch.Tensor, use_branch: bool = False) -> torch.Tensor:
    logits = model(tokens[:, :-1], use_branch=use_branch)
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def orthogonalized_in_step(opt: torch.optim.Optimizer) -> int:
    """``opt.step()`` under torch.profiler: the matrices this rank orthogonalized in it,
    read from the rule's Newton-Schulz ranges (what a user's profile shows)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    return count_orthogonalized(prof.events())


def _pair(hp: dict | None = None, **zero_kwargs):
    hp = {**HP, **(hp or {})}
    torch.manual_seed(0)
    model = MuonNet()
    ref = copy.deepcopy(model)
    opt = shardopt.ZeroOptimizer(shardopt.muon_param_groups(model), shardopt.Muon, **zero_kwargs, **hp)
    return model, ref, opt, shardopt.Muon(shardopt.muon_param_groups(ref), **hp)


def _train(rank: int, world: int, model, ref, opt, ref_opt, *, clip: float | None = None,
           poison_step: int | None = None) -> dict[str, object]:
    """STEPS steps; the branch runs on rank 0's slice only (a missing gradient elsewhere).

    Rank 0 runs the oracle (``diff``, ``first_diff``, ``momentum_diff``; ``None`` on
    other ranks, which report a digest of their parameters instead).
    """
    counts, skipped, first_diff = [], [], None
    for step in range(STEPS):
        tokens = batch(step)
        slices = tokens.chunk(world)
        loss = loss_of(model, slices[rank], use_branch=rank == 0)
        if step == poison_step and rank == world - 1:
            loss = loss * float("inf")  # every gradient of this rank becomes inf or nan
        loss.backward()
        # The count is fixed by the plan: profile (which costs seconds over a run) the first
        # step, the first in the adopted launch order, the last and a skipped one.
        if step in (0, 1, STEPS - 1, poison_step):
            counts.append(orthogonalized_in_step(opt))
        else:
            opt.step()
            counts.append(None)
        opt.zero_grad()
        if step == poison_step:
            skipped.append(opt.num_skipped_steps)
            continue  # the oracle skips the step too: no update, no momentum change
        if rank != 0:
            continue
        # The oracle: the mean of the ranks' losses, each on its own slice.
        total = sum(loss_of(ref, part, use_branch=r == 0) for r, part in enumerate(slices)) / world
        total.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(ref.parameters(), clip)
        ref_opt.step()
        ref_opt.zero_grad()
        if first_diff is None:
            first_diff = max_diff(model, ref)
    full = opt.full_state_dict()
    momentum_diff = None
    if full is not None:
        momentum_diff = 0.0
        ref_state = ref_opt.state_dict()["state"]
        for index, entry in full["state"].items():
            if "momentum_buffer" in entry:
                theirs = ref_state[index]["momentum_buffer"]
                momentum_diff = max(momentum_diff, (entry["momentum_buffer"] - theirs).abs().max().item())
    return {"diff": max_diff(model, ref) if rank == 0 else None, "first_diff": first_diff,
            "momentum_diff": momentum_diff, "digest": [p.double().sum().item() for p in model.parameters()],
            "orthogonalized": counts, "params": [p.detach().clone() for p in model.parameters()],
            "skipped": skipped, "straddlers": len(opt.plan.straddlers), "exchange": opt.comm_stats().get("exchange", 0),
            "planned_exchange": opt.plan.exchange_numel(opt.comm.rank) * wire_itemsize(opt) * STEPS,
            "num_buckets": len(opt.plan.buckets), "comm": opt.comm_stats(),
            "padding": opt.plan.padding_numel}


EQUIVALENCE = [(layout, stage, bucket_numel, ns_dtype)
               for layout, stage, bucket_numel in (("balanced", 2, 400), ("balanced", 1, 400), ("whole", 2, 400),
                                                   ("balanced", 2, 1 << 20))
               for ns_dtype in ("float32", "bfloat16")]


def equivalence_variants(world: int) -> list[tuple[str, int, int, str]]:
    """The variants run at ``world`` ranks: all at 2; at 1, 3 and 4 each layout
    configuration once, with the Newton-Schulz dtypes alternating (3 and 4 between
    them run every variant; 1, without communication, needs only each layout)."""
    if world == 2:
        return list(EQUIVALENCE)
    return [v for i, v in enumerate(EQUIVALENCE) if (i // 2 + i % 2 + world) % 2 == 0]


def wire_itemsize(opt: shardopt.ZeroOptimizer) -> int:
    """Bytes per element of the straddler exchange: the Muon group's Newton-Schulz dtype."""
    group = next(g for g in opt.param_groups if g.get("use_muon", True))
    return torch.empty((), dtype=opt.inner.muon_rule.exchange_dtype(group, torch.float32)).element_size()


def equivalence(rank: int, world: int) -> dict[str, object]:
    """Every layout and stage, with fp32 and with the default bf16 Newton-Schulz.

    The balanced layout with small buckets (straddlers, several all-gathers in
    flight) runs twice from the same seed: ``rerun_diff`` is the largest difference
    between the two runs' parameters (0.0 when the run is deterministic).
    """
    out = {}
    for layout, stage, bucket_numel, ns_dtype in equivalence_variants(world):
        runs = []
        for _ in range(2 if (layout, bucket_numel) == ("balanced", 400) else 1):
            model, ref, opt, ref_opt = _pair({"ns_dtype": ns_dtype}, stage=stage, matrix_layout=layout,
                                             bucket_numel=bucket_numel)
            runs.append(_train(rank, world, model, ref, opt, ref_opt))
        first, second = runs[0], runs[-1]
        first["rerun_diff"] = max((a - b).abs().max().item() for a, b in zip(first["params"], second["params"]))
        first["reran"] = len(runs) == 2
        del first["params"]
        out[f"{layout}-{stage}-{bucket_numel}-{ns_dtype}"] = first
    return out


def semantics(rank: int, world: int) -> dict[str, object]:
    """Clipping acts on raw gradients before momentum; a non-finite gradient skips the
    step without touching momentum; missing gradients count as zeros."""
    model, ref, opt, ref_opt = _pair(max_grad_norm=0.5, bucket_numel=400)
    out = _train(rank, world, model, ref, opt, ref_opt, clip=0.5, poison_step=7)
    del out["params"]
    return out


def _lockstep(rank: int, world: int, steps: range, model, opt, ref, ref_opt) -> None:
    """Train ``model`` on this rank's slice and ``ref`` on the whole batch, step by step.

    Every parameter gets a gradient: the single-process optimizer skips one that has
    none, ZeroOptimizer treats it as zero (documented).
    """
    for step in steps:
        tokens = batch(step)
        loss_of(model, tokens.chunk(world)[rank], use_branch=True).backward()
        opt.step()
        opt.zero_grad()
        total = sum(loss_of(ref, part, use_branch=True) for part in tokens.chunk(world)) / world
        total.backward()
        ref_opt.step()
        ref_opt.zero_grad()


def reshard(rank: int, world: int) -> dict[str, object]:
    """A full state dict of a balanced-layout run loads into a whole-layout ZeroOptimizer
    (a different plan) and into the single-process Muon; both then continue identically."""
    model, ref, opt, ref_opt = _pair(bucket_numel=400)
    _train(rank, world, model, ref, opt, ref_opt)
    full = opt.full_state_dict(all_ranks=True)
    moved, single = copy.deepcopy(model), copy.deepcopy(model)
    moved_opt = shardopt.ZeroOptimizer(shardopt.muon_param_groups(moved), shardopt.Muon, matrix_layout="whole",
                                       bucket_numel=256, **HP)
    moved_opt.load_state_dict(full)
    single_opt = shardopt.Muon(shardopt.muon_param_groups(single), **HP)
    single_opt.load_state_dict(full)
    _lockstep(rank, world, range(STEPS, STEPS + 3), moved, moved_opt, single, single_opt)
    return {"diff": max_diff(moved, single), "moved": max_diff(moved, model)}


def bf16(rank: int, world: int) -> dict[str, object]:
    """bf16 parameters with fp32 master weights (straddlers, chunked all-gather) track fp32 Muon."""
    torch.manual_seed(0)
    ref = MuonNet()
    model = copy.deepcopy(ref).to(torch.bfloat16)
    opt = shardopt.ZeroOptimizer(shardopt.muon_param_groups(model), shardopt.Muon, bucket_numel=400, **HP)
    ref_opt = shardopt.Muon(shardopt.muon_param_groups(ref), **HP)
    start = copy.deepcopy(ref)
    _lockstep(rank, world, range(STEPS), model, opt, ref, ref_opt)
    return {"diff": max((a.float() - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters())),
            "moved": max_diff(ref, start), "master_bytes": opt.memory_report()["master_params"],
            "straddlers": len(opt.plan.straddlers)}


def adamw_comm(rank: int, world: int) -> dict[str, object]:
    """Bytes per step of ZeRO AdamW and of ZeRO Muon on the same model."""
    out = {}
    for name in ("adamw", "muon"):
        torch.manual_seed(0)
        model = MuonNet()
        if name == "adamw":
            opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.AdamW, lr=0.01, bucket_numel=400)
        else:
            opt = shardopt.ZeroOptimizer(shardopt.muon_param_groups(model), shardopt.Muon, bucket_numel=400, **HP)
        before = dict(opt.comm_stats())
        loss_of(model, batch(0).chunk(world)[rank], use_branch=True).backward()
        opt.step()
        after = opt.comm_stats()
        out[name] = {kind: after[kind] - before.get(kind, 0) for kind in after}
        out[f"{name}_padding"] = opt.plan.padding_numel
        out[f"{name}_flat"] = opt.plan.flat_numel
        out[f"{name}_exchange_planned"] = opt.plan.exchange_numel(opt.comm.rank)
    return out


def suite(rank: int, world: int, programs: list[str]) -> dict[str, object]:
    # Every collective compared across ranks first (shardopt/comm.py): a rank issuing
    # another dtype or count than its peers raises instead of misreading bytes. It
    # doubles the run time of these small-bucket programs, so at two ranks only.
    if world <= 2:
        os.environ["SHARDOPT_CHECK_COLLECTIVES"] = "1"
    return {name: globals()[name](rank, world) for name in programs}
