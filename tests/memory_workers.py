"""Runs on every spawned rank for test_memory.py: ZeroOptimizer's measured bytes, per case.

Each case builds ``PlanNet``, wraps it in ZeroOptimizer with the optimizer the
planner's registry names (``shardopt.planner.OPTIMIZERS``), takes one step
(states are allocated at the first step) and returns ``memory_report()`` plus
what the report does not cover: the plan's buckets, each group's declared
state, the bytes of ``p.grad`` tensors that are not views of a bucket, and the
peak of full-bucket gradient buffers alive during backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import shardopt
from shardopt import planner
from shardopt.zero import checks as zero_checks
from shardopt.zero.plan import DEFAULT_BUCKET_NUMEL
from shardopt.zero.schedule import reduce_units

VOCAB, WIDTH, BATCH, SEQ = 23, 10, 12, 5  # BATCH divisible by world sizes 1-4


class PlanNet(nn.Module):
    """Odd shapes, a 1-element parameter, a 3-D expert stack, a bias-free layer and a frozen tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.experts = nn.Parameter(torch.randn(3, WIDTH, 7) * 0.1)
        self.frozen = nn.Parameter(torch.ones(5), requires_grad=False)
        self.down = nn.Linear(7, WIDTH)
        self.gate = nn.Parameter(torch.full((1,), 0.5))
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(tokens))
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / WIDTH**0.5, dim=-1)
        h = h + self.gate * self.proj(att @ v)
        experts = torch.relu(torch.einsum("btd,edf->btef", h, self.experts.to(h.dtype))).mean(2)
        return self.lm_head(h + self.down(experts))


# (label, optimizer, stage, param dtype, precision name or (reduce, master), bucket_numel)
# (label, optimizer, stage, param dtype, precision, bucket_numel, Muon matrix_layout)
CASES = [(f"{o}/stage{s}/fp32", o, s, "float32", "fp32", 256, "balanced") for o in planner.OPTIMIZERS for s in (1, 2)]
CASES += [
    ("adamw/stage2/mixed", "adamw", 2, "bfloat16", "mixed", 256, "balanced"),
    ("adamw/stage1/mixed", "adamw", 1, "bfloat16", "mixed", 256, "balanced"),
    ("muon/stage2/mixed", "muon", 2, "bfloat16", "mixed", 512, "balanced"),
    ("muon/stage2/mixed-whole", "muon", 2, "bfloat16", "mixed", 512, "whole"),
    ("muon/stage1/fp32-whole", "muon", 1, "float32", "fp32", 512, "whole"),
    ("adamw/stage1/bf16-fp32reduce", "adamw", 1, "bfloat16", ("float32", "float32"), 256, "balanced"),
    ("lion/stage2/bf16", "lion", 2, "bfloat16", "bf16", 10_000, "balanced"),
    ("adam/stage2/fp32-one-bucket", "adam", 2, "float32", "fp32", DEFAULT_BUCKET_NUMEL, "balanced"),
]


def layout_of(plan: shardopt.ShardPlan) -> str:
    """The plan's placement without parameter names (the planner names parameters differently)."""
    return repr((plan.storages, [b.chunk for b in plan.buckets], reduce_units(plan)))


def precision_of(param_dtype: str, precision: str | tuple[str, str]) -> planner.Precision:
    if isinstance(precision, str):
        return planner.PRECISIONS[precision]
    return planner.Precision("custom", param_dtype, *precision)


def _arrival_probe(model: nn.Module) -> list[str]:
    """Record the order gradients arrive in."""
    order: list[str] = []

    def make_probe(name: str):
        def probe(_: torch.Tensor) -> None:
            order.append(name)

        return probe

    for name, p in model.named_parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(make_probe(name))
    return order


def measure(rank: int, world: int, case: tuple, group: object) -> dict[str, object]:
    _label, optimizer, stage, dtype, precision, bucket_numel, layout = case
    torch.manual_seed(0)
    model = PlanNet().to(getattr(torch, dtype))
    cls, hp = planner.OPTIMIZERS[optimizer]
    params = shardopt.muon_param_groups(model) if optimizer == "muon" else model.parameters()
    opt = shardopt.ZeroOptimizer(params, cls, stage=stage, bucket_numel=bucket_numel, process_group=group,
                                 precision=precision_of(dtype, precision).policy(), matrix_layout=layout,
                                 lr=1e-3, **hp)
    trainable = [p for p in model.parameters() if p.requires_grad]
    order = _arrival_probe(model)
    casts: list[int] = []
    grad_regions = opt._grad_regions

    def recording() -> list[torch.Tensor]:
        # The gradient regions step() works on: casts are new storages, not bucket views.
        out = grad_regions()
        kept = {t.untyped_storage().data_ptr() for s in opt.storages for t in (s.grad_flat, s.grad_area)
                if t is not None}
        casts.append(sum(g.untyped_storage().nbytes() for g in out if g.untyped_storage().data_ptr() not in kept))
        return out

    opt._grad_regions = recording
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen).chunk(world)[rank]
    # Two steps: from the second on, the reducer launches in the order the first completed,
    # and the buffer pool has settled (the planner replays it until it does: tested equal).
    for step in range(2):
        if step >= 1:
            order.clear()
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
    report = opt.memory_report()
    flats = {s.grad_flat.untyped_storage().data_ptr() for s in opt.storages if s.grad_flat is not None}
    copies = sum(p.grad.untyped_storage().nbytes() for p in trainable
                 if p.grad is not None and p.grad.untyped_storage().data_ptr() not in flats)
    specs = [(type(opt.inner.rule_for_group(g)).__name__, [s.name for s in opt.inner.rule_for_group(g).state_specs(g)])
             for g in opt.param_groups]
    return {
        "report": {k: report[k] for k in ("params", "grads", "master_params", "optimizer_states", "comm_buffers",
                                          "grad_cast", "staging_buffers")},
        "layout": layout_of(opt.plan),
        "specs": specs,
        "grad_copies": copies,
        # The second backward's, launched in the order the first completed.
        "grad_window_peak": report["comm_buffers_peak"],
        "grad_arrival": order,
        "grad_cast": casts[0],
    }


def all_cases(rank: int, world: int) -> dict[int, dict[str, dict[str, object]]]:
    """Every case at world sizes 1..``world`` in one spawn, on subgroups of the first ranks.

    A spawn costs seconds (importing torch, then torch._dynamo at the first
    optimizer), a case milliseconds: one spawn of 4 ranks serves world sizes 1-4.
    """
    torch.set_num_threads(1)
    # ZeroOptimizer's DistributedDataParallel check walks every object the garbage
    # collector tracks, 0.3-0.6 s per construction here; it allocates nothing, so
    # skipping it changes no byte measured and keeps 100 constructions in seconds.
    zero_checks.reject_ddp = lambda *args, **kwargs: None
    # The first torch.optim construction imports torch._dynamo (seconds): pay it on
    # every rank at once, not on each rank when its first world size comes.
    shardopt.SGD([nn.Parameter(torch.zeros(1))])
    groups = {size: dist.new_group(list(range(size))) for size in range(1, world + 1)}
    out: dict[int, dict[str, dict[str, object]]] = {}
    for size, group in groups.items():
        if rank < size:
            out[size] = {case[0]: measure(rank, size, case, group) for case in CASES}
        dist.barrier()
    return out
