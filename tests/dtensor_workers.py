"""Rank programs for ``test_dtensor_elementwise``: shardopt's elementwise optimizers on
FSDP2 (``fully_shard``) and FSDP2 x TP DTensor parameters against one process.

All rules train at once: the model is one independent branch per rule
(Linear -> Tanh -> Linear -> LayerNorm, the loss the sum of the branches' mean
squared errors), each branch stepped by its own optimizer. A branch's gradient
depends on its branch only, so each optimizer sees exactly what it would alone,
while FSDP2 gathers and reduces the whole model in one collective per pass: a
step of eleven optimizers costs the collectives of one.

The oracle is the single-process model on the full batch; each rank trains on its
data-parallel slice of it (TP ranks of one dp index share a slice). FSDP2 averages
the slices' gradients, which is the gradient of the full batch's mean loss. Every
rank runs the oracle and compares its own shards with the same pieces of the
oracle's tensors (``distribute_tensor`` with ``src_data_rank=None`` cuts locally),
so the comparison needs no collective either.
"""

from __future__ import annotations

import contextlib
import hashlib
import math

import torch
import torch.distributed as dist
from torch import nn

STEPS = 20
D_IN, HIDDEN, D_OUT, BATCH = 6, 16, 7, 8  # D_OUT odd: FSDP2's dim-0 shards are uneven
MAX_NORM = 0.5  # below the gradients' norm on most steps, so the clip scales them
COUNTED_STEPS = (0, 1, STEPS - 1)
SMALL_CHUNK = 20  # forces shardopt's CPU chunking onto pieces of the local shards


def _rules():
    import shardopt

    return {
        "sgd": lambda ps: shardopt.SGD(ps, lr=0.05, weight_decay=0.01),
        "sgd_momentum": lambda ps: shardopt.SGD(ps, lr=0.05, momentum=0.9, dampening=0.1),
        "sgd_nesterov": lambda ps: shardopt.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
        "adagrad": lambda ps: shardopt.Adagrad(ps, lr=0.05, lr_decay=0.01, weight_decay=0.01,
                                               initial_accumulator_value=0.1),
        "rmsprop": lambda ps: shardopt.RMSprop(ps, lr=0.01),
        "rmsprop_centered": lambda ps: shardopt.RMSprop(ps, lr=1e-3, momentum=0.5, centered=True,
                                                        weight_decay=0.01),
        "adam": lambda ps: shardopt.Adam(ps, lr=0.01, weight_decay=0.01),
        "adam_amsgrad": lambda ps: shardopt.Adam(ps, lr=0.01, amsgrad=True),
        "adamw": lambda ps: shardopt.AdamW(ps, lr=0.01, weight_decay=0.1),
        "adamw_amsgrad": lambda ps: shardopt.AdamW(ps, lr=0.01, amsgrad=True),
        "lion": lambda ps: shardopt.Lion(ps, lr=1e-3, weight_decay=0.1),
    }


RULES = tuple(_rules())


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleDict({
            name: nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, D_OUT), nn.LayerNorm(D_OUT))
            for name in RULES
        })

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum(((branch(x) - y) ** 2).mean() for branch in self.branches.values())


def _device_type() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def _shard(model: nn.Module, mode: str):
    """Shard ``model`` in place; returns (data-parallel index, data-parallel size)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    world = dist.get_world_size()
    if mode == "fsdp":
        mesh = init_device_mesh(_device_type(), (world,), mesh_dim_names=("dp",))
        fully_shard(model, mesh=mesh)
        return mesh.get_local_rank(), world
    mesh = init_device_mesh(_device_type(), (world // 2, 2), mesh_dim_names=("dp", "tp"))
    for branch in model.branches.values():
        # Column-wise then row-wise: the first weight is cut along dim 0 by TP and again
        # by FSDP2 (_StridedShard), the second along dim 1 by TP (Shard(1)); the
        # LayerNorm stays out of TP, a DTensor on the dp sub-mesh only.
        parallelize_module(branch, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    return mesh["dp"].get_local_rank(), mesh["dp"].size()


def _data(step: int, device: str):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, D_IN, generator=g).to(device), torch.randn(BATCH, D_OUT, generator=g).to(device)


def _oracle(device: str) -> dict:
    """The single-process run on the full batch: final parameters and states, norms."""
    from shardopt.dtensor import grad_norm

    torch.manual_seed(0)
    model = Branches().to(device)
    opts = {name: make(model.branches[name].parameters()) for name, make in _rules().items()}
    norms = []
    for step in range(STEPS):
        x, y = _data(step, device)
        model(x, y).backward()
        if step == 0:
            grads = [p.grad for p in model.parameters()]
            norms.append(float(grad_norm(grads, math.inf)))
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        for opt in opts.values():
            opt.step()
            opt.zero_grad()
    return {"model": model, "opts": opts, "norms": norms}


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _train(mode: str, device: str) -> dict:
    from torch.distributed.tensor.debug import CommDebugMode

    from shardopt.dtensor import clip_grad_norm_, grad_norm

    torch.manual_seed(0)
    model = Branches().to(device)
    dp, dp_size = _shard(model, mode)
    opts = {name: make(model.branches[name].parameters()) for name, make in _rules().items()}
    step_comms, clip_comms, norms = 0, [], []
    for step in range(STEPS):
        x, y = _data(step, device)
        model(x.chunk(dp_size)[dp], y.chunk(dp_size)[dp]).backward()
        # Counted where the rules take other paths (the first step allocates state;
        # SGD's dampened momentum copies the first gradient) and at the end; counting
        # every step would double the test's time (CommDebugMode sees every op).
        counted = step in COUNTED_STEPS
        with CommDebugMode() if counted else contextlib.nullcontext() as comm:
            if step == 0:
                grads = [p.grad for p in model.parameters()]
                norms.append(float(grad_norm(grads, math.inf)))
            norms.append(float(clip_grad_norm_(model.parameters(), MAX_NORM)))
        if counted:
            clip_comms.append(comm.get_total_counts())
        with CommDebugMode() if counted else contextlib.nullcontext() as comm:
            for opt in opts.values():
                opt.step()
        if counted:
            step_comms += comm.get_total_counts()
        for opt in opts.values():
            opt.zero_grad()
    return {"model": model, "opts": opts, "norms": norms, "step_comms": step_comms, "clip_comms": clip_comms}


def _piece(full: torch.Tensor, like) -> torch.Tensor:
    """This rank's piece of ``full`` in the layout of the DTensor ``like``, cut locally."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def _compare(run: dict, oracle: dict) -> dict:
    """Per rule, the largest difference between this rank's shards and the same pieces
    of the oracle's: of the parameters (absolute), of the states (relative to the
    state's largest magnitude); the states that do not keep their parameter's layout;
    the placements seen."""
    from torch.distributed.tensor import DTensor

    diffs, state_diffs, layout_errors, placements = {}, {}, [], set()
    for name in RULES:
        worst, worst_state = 0.0, 0.0
        sharded = list(run["model"].branches[name].parameters())
        for param, ref in zip(sharded, oracle["model"].branches[name].parameters()):
            placements.update(repr(p) for p in param.placements)
            worst = max(worst, _max_diff(param.to_local(), _piece(ref, param)))
            state, ref_state = run["opts"][name].state[param], oracle["opts"][name].state[ref]
            assert sorted(state) == sorted(ref_state), (name, sorted(state), sorted(ref_state))
            for key, value in state.items():
                ref_value = ref_state[key]
                if value.dim() == 0:
                    worst_state = max(worst_state, abs(float(value) - float(ref_value)))
                elif isinstance(value, DTensor) and value.placements == param.placements \
                        and value.device_mesh == param.device_mesh:
                    scale = max(ref_value.abs().max().item(), 1e-30)
                    worst_state = max(worst_state, _max_diff(value.to_local(), _piece(ref_value, param)) / scale)
                else:
                    layout_errors.append(f"{name}.{key}: {type(value).__name__}")
        diffs[name], state_diffs[name] = worst, worst_state
    return {"diffs": diffs, "state_diffs": state_diffs, "layout_errors": layout_errors,
            "placements": sorted(placements)}


def _local_digest(run: dict) -> str:
    tensors = []
    for name in RULES:
        for param in run["model"].branches[name].parameters():
            tensors.append(param.to_local())
            tensors += [v.to_local() if v.dim() else v for _, v in sorted(run["opts"][name].state[param].items())]
    return _digest(tensors)


def suite(rank: int, world_size: int, mode: str) -> dict:
    """Train (FSDP2 alone: twice, the second time with shardopt's CPU chunking forced
    onto pieces of the local shards) and compare with the oracle and with each other."""
    import shardopt.rules.base as base

    device = _device_type()
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    oracle = _oracle(device)
    first = _train(mode, device)
    runs = [first]
    if mode == "fsdp":
        # The rerun (chunking on local shards) costs the 4-rank job 12 s of CPU: run at 2 ranks,
        # where the same per-shard code path is taken.
        chunk = base.CPU_CHUNK_NUMEL
        base.CPU_CHUNK_NUMEL = SMALL_CHUNK
        try:
            runs.append(_train(mode, device))
        finally:
            base.CPU_CHUNK_NUMEL = chunk
    out = _compare(first, oracle)
    norm_diff = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(first["norms"], oracle["norms"]))
    return {
        **out,
        "norm_rel_diff": norm_diff,
        "clipped_steps": sum(n > MAX_NORM for n in oracle["norms"][1:]),
        "step_comms": sum(run["step_comms"] for run in runs),
        "clip_comms": [run["clip_comms"] for run in runs],
        "digests": [_local_digest(run) for run in runs],
        "norms_equal": all(run["norms"] == first["norms"] for run in runs),
    }
