"""The example's GPT on PyTorch's own parameter-sharding engines, for ``train_gpt.py --parallel fsdp2``.

FSDP2 (``fully_shard``, ZeRO-3: every parameter sharded over the data-parallel
ranks) and, with ``--tp N``, FSDP2 x tensor parallelism on a 2-D device mesh
(``dp`` x ``tp``): each block's matrices are split over the ``tp`` ranks by
``parallelize_module`` and FSDP2 shards the result over ``dp``. shardopt's
optimizers step the DTensor shards that these engines leave, unchanged from one
process: the elementwise rules locally, ``shardopt.Muon`` with one owner per matrix
in the whole job (``docs/design/dtensor.md``).

The tensor-parallel plan of a block (``gpt_model.Block``): ``qkv`` and ``mlp_up``
column-wise (each rank computes a contiguous share of the output features: whole
heads, since ``qkv`` stores its rows head by head), ``attn_out`` and ``mlp_down``
row-wise (each rank multiplies its share of the input features, one all-reduce
sums the parts). Embeddings, norms and the output head stay out of TP: every ``tp``
rank computes them on the same data, and FSDP2 shards them over ``dp`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from gpt_model import GPT, GPTConfig
from torch import nn

# gpt_model.Block's submodules and how TP splits each (see the module docstring).
COLUMN_WISE = ("qkv", "mlp_up")
ROW_WISE = ("attn_out", "mlp_down")


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: its data-parallel index and size pick its slice of the batch.

    Ranks that differ only in their ``tp`` index hold different parts of the same
    matrices and must see the same data, so the batch is cut ``dp_size`` ways.
    """

    mesh: Any  # DeviceMesh: ("dp",) or ("dp", "tp")
    dp_rank: int
    dp_size: int
    tp: int

    def describe(self) -> str:
        return "FSDP2" if self.tp == 1 else f"FSDP2 x TP (dp {self.dp_size} x tp {self.tp})"


def tp_problem(config: GPTConfig, tp: int, world: int | None = None) -> str | None:
    """Why ``tp`` cannot split this model (or this many ranks), as one line, or None."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        return f"tp must be an int >= 1, got {tp!r}"
    if config.num_heads % tp:
        return (f"tp {tp} does not divide the model's {config.num_heads} attention heads "
                "(each tensor-parallel rank computes whole heads)")
    if world is not None and world % tp:
        return f"tp {tp} does not divide the world size {world} (the mesh is dp x tp)"
    return None


def ensure_process_group() -> bool:
    """A one-rank gloo group when no launcher made one (DeviceMesh needs a group); True if created here."""
    if dist.is_initialized():
        return False
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return True


def shard_model(model: GPT, device: torch.device, tp: int) -> Layout:
    """Put ``model`` on FSDP2 over every rank, or on a dp x ``tp`` mesh with TP inside each block.

    ``fully_shard`` per block, then on the root (embeddings, final norm, head): FSDP2
    gathers one block's parameters at a time instead of the whole model at once.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    problem = tp_problem(model.config, tp, world)
    if problem:
        raise ValueError(problem)
    if tp == 1:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
        dp_mesh = mesh
    else:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
        dp_mesh = mesh["dp"]
        plan = {**{name: ColwiseParallel() for name in COLUMN_WISE}, **{name: RowwiseParallel() for name in ROW_WISE}}
        for block in model.blocks:
            parallelize_module(block, mesh["tp"], plan)
    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return Layout(mesh, dp_mesh.get_local_rank(), dp_mesh.size(), tp)


def build_optimizer(model: nn.Module, optimizer_class: type, hyperparameters: dict[str, Any]
                    ) -> torch.optim.Optimizer:
    """shardopt's single-process optimizer on the sharded model: it finds the DTensors itself."""
    import shardopt

    params = shardopt.muon_param_groups(model) if optimizer_class is shardopt.Muon else model.parameters()
    return optimizer_class(params, **hyperparameters)


def clip(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip by the global gradient norm over every shard and mesh (torch's fails on mixed meshes)."""
    from shardopt.dtensor import clip_grad_norm_

    return clip_grad_norm_(model.parameters(), max_norm)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """This rank's optimizer-state bytes: its shards of every state tensor."""
    return sum(_local(v).numel() * _local(v).element_size()
               for entry in optimizer.state.values() for v in entry.values() if torch.is_tensor(v))


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, by name (a collective: each DTensor is gathered on every rank)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
            for name, p in model.named_parameters()}
