"""Rank programs for ``test_dtensor_muon``: shardopt.Muon (with its AdamW group) on FSDP2
(``fully_shard``) DTensor parameters against the single-process optimizer.

The model's matrices are cut unevenly: 9 rows over 2 ranks, a 1-row gate (one
rank holds an empty shard), and one matrix FSDP2 shards along dim 1
(``shard_placement_fn``; FSDP2 requires that dim to divide evenly), so no piece
is assumed to be a contiguous dim-0 chunk.
Every rank runs the oracle (the whole model, full batch, one process) and compares
its shards with the same pieces of the oracle's parameters, cut locally.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
import torch.distributed as dist
from torch import nn

STEPS = 20  # as the elementwise FSDP2 tests; at least 20 steps of the optimizer against its oracle
D_IN, H0, H1, H2, BATCH = 6, 16, 15, 9, 8
COUNTED_STEPS = (0, STEPS - 1)  # the first plans the exchange (one fingerprint all-gather)
BUCKET_NUMEL = 64


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, H0)
        self.fc2 = nn.Linear(H0, H1)       # 15 x 16, sharded along dim 1 by FSDP2 (shard_placement_fn)
        self.fc3 = nn.Linear(H1, H2)
        self.gate = nn.Linear(H2, 1, bias=False)  # 1 row: an empty shard on rank 1
        self.norm = nn.LayerNorm(H2)
        self.head = nn.Linear(H2, 5)       # the output head: AdamW

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))))
        out = self.head(self.norm(h)) * torch.sigmoid(self.gate(h))
        return ((out - y) ** 2).mean()


def _device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def _data(step: int, device: str):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, D_IN, generator=g).to(device), torch.randn(BATCH, 5, generator=g).to(device)


def _optimizer(model: nn.Module, ns_dtype: str):
    import shardopt

    return shardopt.Muon(shardopt.muon_param_groups(model, lr=0.01), lr=0.02, ns_dtype=ns_dtype)


def _oracle(device: str, ns_dtype: str) -> nn.Module:
    torch.manual_seed(0)
    model = Net().to(device)
    opt = _optimizer(model, ns_dtype)
    for step in range(STEPS):
        model(*_data(step, device)).backward()
        opt.step()
        opt.zero_grad()
    return model


class _Wire:
    """Counts c10d calls made inside ``step()``, and the bytes all_to_all_single sends to
    other ranks (its input minus the part addressed to this rank)."""

    NAMES = ("all_to_all_single", "all_gather", "all_gather_into_tensor", "all_reduce", "reduce_scatter_tensor",
             "broadcast", "all_to_all", "reduce_scatter")

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.bytes = 0

    @contextlib.contextmanager
    def counting(self):
        saved = {name: getattr(dist, name) for name in self.NAMES}

        def wrap(name):
            def call(*args, **kwargs):
                self.calls[name] = self.calls.get(name, 0) + 1
                if name == "all_to_all_single":
                    send, in_splits = args[1], args[3]
                    group = kwargs.get("group")
                    self.bytes += (send.numel() - in_splits[dist.get_rank(group)]) * send.element_size()
                return saved[name](*args, **kwargs)
            return call

        for name in self.NAMES:
            setattr(dist, name, wrap(name))
        try:
            yield self
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)


def _shard(model: nn.Module, device: str, mode: str) -> tuple[int, int]:
    """Shard ``model`` in place; returns (data-parallel index, data-parallel size)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    world = dist.get_world_size()
    if mode == "fsdp":
        mesh = init_device_mesh(device, (world,), mesh_dim_names=("dp",))
        fc2 = model.fc2.weight
        fully_shard(model, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p is fc2 else Shard(0))
        return mesh.get_local_rank(), world
    mesh = init_device_mesh(device, (world // 2, 2), mesh_dim_names=("dp", "tp"))
    # fc1/fc3 column-wise (_StridedShard(0) x Shard(0) after FSDP2), fc2 row-wise
    # (Shard(0) x Shard(1)); the gate is left out of TP: it lives on the dp sub-mesh,
    # one replica per tp index, and must still be orthogonalized once in the job.
    parallelize_module(model, mesh["tp"], {
        "fc1": ColwiseParallel(), "fc2": RowwiseParallel(),
        "fc3": ColwiseParallel(output_layouts=Replicate()),
    })
    fully_shard(model, mesh=mesh["dp"])
    return mesh["dp"].get_local_rank(), mesh["dp"].size()


def _train(device: str, ns_dtype: str, mode: str = "fsdp", bucket_numel: int | None = None) -> dict:
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.profiler import ProfilerActivity, profile

    from shardopt.rules.muon import count_orthogonalized

    torch.manual_seed(0)
    model = Net().to(device)
    dp, dp_size = _shard(model, device, mode)
    opt = _optimizer(model, ns_dtype)
    if bucket_numel is not None:
        opt.param_groups[0]["exchange_bucket_numel"] = bucket_numel
    wire, orthogonalized, dtensor_comms = _Wire(), [], []
    for step in range(STEPS):
        x, y = _data(step, device)
        model(x.chunk(dp_size)[dp], y.chunk(dp_size)[dp]).backward()
        if step in COUNTED_STEPS:
            with CommDebugMode() as comm, wire.counting(), profile(activities=[ProfilerActivity.CPU]) as prof:
                opt.step()
            orthogonalized.append(count_orthogonalized(prof.events()))
            dtensor_comms.append({str(k): v for k, v in comm.get_comm_counts().items()})
        else:
            opt.step()
        opt.zero_grad()
    muon = opt.param_groups[0]
    assert muon["use_muon"]
    local_numel = sum(p.to_local().numel() for p in muon["params"])
    return {"model": model, "opt": opt, "wire_calls": wire.calls, "wire_bytes": wire.bytes,
            "orthogonalized": orthogonalized, "dtensor_comms": dtensor_comms, "local_muon_numel": local_numel,
            "muon_matrices": len(muon["params"])}


def _piece(full: torch.Tensor, like) -> torch.Tensor:
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def _digest(model: nn.Module, opt) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        tensors = [p.to_local()] + [v.to_local() if v.dim() else v for _, v in sorted(opt.state[p].items())]
        for t in tensors:
            h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _same_shapes(device: str) -> float:
    """Matrices of one shape owned by one rank, interleaved with another shape (rank 1
    owns the 4x8, 6x8 and 4x8 matrices): fp32 Newton-Schulz batches the two 4x8 together,
    out of matrix order. The worst difference from
    the single-process optimizer after 3 steps."""
    from torch.distributed.fsdp import fully_shard

    import shardopt

    class Parallel(nn.Module):  # the branches see the same input; shapes 8x8, 4x8, 6x8, 4x8
        def __init__(self) -> None:
            super().__init__()
            self.branches = nn.ModuleList(nn.Linear(8, n, bias=False) for n in (8, 4, 6, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.tanh(b(x)) for b in self.branches], dim=1)

    def build():
        torch.manual_seed(1)
        return Parallel().to(device)

    def steps(model, rank, world):
        opt = shardopt.Muon(model.parameters(), lr=0.02, ns_dtype="float32")
        for step in range(3):
            x, _ = _data(step, device)
            x = torch.cat([x, x[:, :2]], dim=1)  # 8 features
            (model(x.chunk(world)[rank]) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        return model

    oracle = steps(build(), 0, 1)
    model = build()
    fully_shard(model)
    steps(model, dist.get_rank(), dist.get_world_size())
    return max((p.full_tensor() - q).abs().max().item() for p, q in zip(model.parameters(), oracle.parameters()))


def _mismatch(device: str) -> str:
    """The error when the ranks of a mesh step different matrices (rank 0 one more)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    from shardopt.dtensor.exchange import exchange_plans

    mesh = init_device_mesh(device, (dist.get_world_size(),))
    shapes = [(8, 4), (3, 5)] + ([(6, 2)] if dist.get_rank() == 0 else [])
    try:
        exchange_plans(mesh, shapes, [(Shard(0),)] * len(shapes), [1] * len(shapes), 1 << 20, torch.device(device))
    except ValueError as error:
        return str(error)
    return "no error"


def suite(rank: int, world_size: int, mode: str = "fsdp") -> dict:
    """fp32 Newton-Schulz twice (bitwise check) and bf16 once, each against its oracle,
    and the exchange plans of the first step."""
    device = _device()
    out: dict = {}
    oracles = {}
    for ns_dtype, runs in (("float32", 2), ("bfloat16", 1)):
        oracle = oracles[ns_dtype] = _oracle(device, ns_dtype)
        trained = [_train(device, ns_dtype, mode) for _ in range(runs)]
        if ns_dtype == "float32":  # exchange rounds of at most BUCKET_NUMEL elements per rank
            trained.append(_train(device, ns_dtype, mode, BUCKET_NUMEL))
        first = trained[0]
        diffs, placements, muon_diffs = {}, set(), []
        for (name, param), ref in zip(first["model"].named_parameters(), oracle.parameters()):
            placements.update(repr(p) for p in param.placements)
            local, expected = param.to_local(), _piece(ref.detach(), param)
            diffs[name] = (local - expected).abs().max().item() if local.numel() else 0.0
        muon_names = {n for n, p in first["model"].named_parameters()
                      if any(p is q for q in first["opt"].param_groups[0]["params"])}
        muon_diffs = max(diffs[n] for n in muon_names)
        out[ns_dtype] = {
            "diffs": diffs, "muon_max_diff": muon_diffs, "placements": sorted(placements),
            "digests": [_digest(t["model"], t["opt"]) for t in trained],
            "bucketed": {k: trained[-1][k] for k in ("wire_calls", "wire_bytes", "orthogonalized", "dtensor_comms")},
            "bucketed_max_diff": max((a.to_local() - b.to_local()).abs().max().item() for a, b in zip(
                trained[0]["model"].parameters(), trained[-1]["model"].parameters()) if a.to_local().numel()),
            **{k: first[k] for k in ("wire_calls", "wire_bytes", "orthogonalized", "dtensor_comms",
                                     "local_muon_numel", "muon_matrices")},
            "muon_names": sorted(muon_names),
        }
    if mode == "fsdp":
        out["mismatch"] = _mismatch(device)
        out["same_shapes"] = _same_shapes(device)
    # What bf16 Newton-Schulz itself moves the single-process result by: the scale of a
    # flipped bf16 rounding's effect after STEPS steps.
    out["bf16_effect"] = {n: (a - b).abs().max().item() for (n, a), b in zip(
        oracles["bfloat16"].named_parameters(), oracles["float32"].parameters())}
    return out
