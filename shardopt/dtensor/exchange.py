"""Who orthogonalizes which DTensor matrix, and what travels where: the exchange plan.

Pure data fixed by shapes, placements and meshes, computed once and cached; the
step that executes it is :mod:`shardopt.dtensor.muon`.

Three decisions:

* **The exchange mesh.** Under FSDP2 x TP, a matrix left out of tensor
  parallelism lives on the dp sub-mesh (``fully_shard(mesh=mesh["dp"])``): each
  tp index holds its own replica of it. Planned on its own mesh, every dp group
  would orthogonalize it, once per tp index. It is planned on the root mesh
  instead, with ``Replicate`` along the dimensions the sub-mesh leaves out, so
  all of the job's matrices share one exchange and each is orthogonalized once
  (:func:`exchange_layout`). A sub-mesh whose dimension names do not name root
  dimensions in order (a flattened mesh) stays on its own mesh.
* **Owners.** Longest processing time first (Graham 1969) on
  ``rule.transform_cost``, as the ZeRO engine's ``matrix_layout="whole"``
  (``shardopt/zero/layout.py``), with one refinement: of the ranks where the
  matrix would not raise the running makespan beyond LPT's own choice, the
  one whose piece saves the most bytes wins (:func:`assign_owners`). The
  makespan bound is LPT's: a matrix that sets the makespan sits on the least
  loaded rank.
* **Rounds.** The matrices are exchanged in rounds of at most ``bucket_numel``
  elements per rank on average (whole-matrix elements, ``bucket_numel x W`` per
  round), so an owner's transient buffers stay bounded on big models; owners are
  chosen over all matrices first, so rounds do not change the balance.

Every rank of the exchange group must plan the same matrices in the same order.
The first plan of a layout checks that with one all-gather of a fingerprint; a
mismatch raises, naming the first difference, instead of hanging in the
all-to-all. A lifted (root-mesh) plan whose ranks disagree, e.g. pipeline
stages holding different layers, falls back to the matrices' own meshes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..zero.policy import DTENSOR_EXCHANGE_BUCKET_NUMEL
from .pieces import Piece, group_coordinates, is_sender, mesh_group, piece_of

# Whole-matrix elements per rank and exchange round, unless a param group sets
# ``exchange_bucket_numel`` (the planner reads the same constant).
DEFAULT_BUCKET_NUMEL = DTENSOR_EXCHANGE_BUCKET_NUMEL


def assign_owners(costs: Sequence[int], numels: Sequence[int], world_size: int,
                  saved: Sequence[Sequence[int]] | None = None) -> list[int]:
    """Owner rank of each matrix: longest processing time first on ``costs``.

    Plain LPT puts each matrix on the rank with the least cost so far (then the fewest
    elements, then the lowest rank). With ``saved[i][r]`` (elements rank ``r`` would not
    send and receive if it owned matrix ``i``), any rank whose load after taking the
    matrix stays within the makespan LPT's choice gives is eligible, and the one saving
    the most wins (then the same ties).
    """
    load, fill = [0] * world_size, [0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        least = min(range(world_size), key=lambda r: (load[r], fill[r], r))
        rank = least
        if saved is not None:
            bound = max(max(load), load[least] + costs[index])
            eligible = [r for r in range(world_size) if load[r] + costs[index] <= bound]
            rank = min(eligible, key=lambda r: (-saved[index][r], load[r], fill[r], r))
        owners[index] = rank
        load[rank] += costs[index]
        fill[rank] += numels[index]
    return owners


def exchange_rounds(numels: Sequence[int], world_size: int, bucket_numel: int) -> list[list[int]]:
    """Consecutive runs of matrix indices holding at most ``bucket_numel * world_size``
    elements each (a bigger matrix alone in its round)."""
    limit = max(1, bucket_numel) * world_size
    rounds: list[list[int]] = []
    total = 0
    for index, numel in enumerate(numels):
        if not rounds or (total + numel > limit and rounds[-1]):
            rounds.append([])
            total = 0
        rounds[-1].append(index)
        total += numel
    return rounds


def _root_mesh(mesh) -> Any:
    # torch 2.13 has DeviceMesh._get_root_mesh(); older releases keep it in _mesh_resources.
    if hasattr(mesh, "_get_root_mesh"):
        return mesh._get_root_mesh()
    from torch.distributed.device_mesh import _mesh_resources

    return _mesh_resources.get_root_mesh(mesh)


_LAYOUTS: dict[tuple, tuple[Any, tuple]] = {}


def exchange_layout(mesh, placements: Sequence) -> tuple[Any, tuple]:
    """The mesh a matrix is exchanged on and its placements there: the root mesh, with
    ``Replicate`` on the dimensions a sub-mesh leaves out, when the sub-mesh's dimension
    names are root dimensions in the root's order; otherwise ``mesh`` itself. Cached:
    it is asked for every matrix at every step."""
    key = (mesh, tuple(placements))
    if key not in _LAYOUTS:
        if len(_LAYOUTS) > 256:
            _LAYOUTS.clear()
        _LAYOUTS[key] = _exchange_layout(mesh, key[1])
    return _LAYOUTS[key]


def _exchange_layout(mesh, placements: tuple) -> tuple[Any, tuple]:
    from torch.distributed.tensor import Replicate

    root = _root_mesh(mesh)
    if root is mesh or root.mesh_dim_names is None or mesh.mesh_dim_names is None:
        return mesh, tuple(placements)
    names, root_names = mesh.mesh_dim_names, root.mesh_dim_names
    if any(name not in root_names for name in names):
        return mesh, tuple(placements)
    dims = [root_names.index(name) for name in names]
    if dims != sorted(dims):  # placements apply left to right; a reordered sub-mesh would change them
        return mesh, tuple(placements)
    lifted: list = [Replicate()] * root.ndim
    for dim, placement in zip(dims, placements):
        lifted[dim] = placement
    return root, tuple(lifted)


@dataclass
class ExchangePlan:
    """One round of one mesh's matrices: everything shapes and placements fix.

    ``indices``: the round's matrices (positions in the mesh's list); the lists below
    are in that order. ``pieces[i][r]``: rank ``r``'s piece of the round's matrix ``i``;
    ``senders[i][r]``: whether ``r`` sends it (the first of its replicas). ``out_*`` /
    ``in_*``: split sizes (elements) of the first all-to-all on this rank; the return
    swaps them, except that owners return to every holder, replicas included.
    """

    group: dist.ProcessGroup | None
    rank: int
    world: int
    indices: list[int]
    owners: list[int]
    pieces: list[list[Piece]]
    senders: list[list[bool]]
    out_counts: list[int]
    in_counts: list[int]
    back_out_counts: list[int]
    back_in_counts: list[int]

    @property
    def owned(self) -> list[int]:
        return [i for i, owner in enumerate(self.owners) if owner == self.rank]

    def bytes_per_step(self, itemsize: int) -> int:
        """Bytes this rank puts on the wire per step in this round (both exchanges)."""
        return (sum(self.out_counts) + sum(self.back_out_counts)) * itemsize


def _round_plan(group, rank: int, world: int, indices: list[int], owners: list[int],
                pieces: list[list[Piece]], senders: list[list[bool]]) -> ExchangePlan:
    out, into, back_out, back_in = [0] * world, [0] * world, [0] * world, [0] * world
    for i, owner in enumerate(owners):
        for r in range(world):
            numel = pieces[i][r].numel
            if r == owner or not numel:
                continue
            if senders[i][r]:
                if r == rank:
                    out[owner] += numel
                if owner == rank:
                    into[r] += numel
            if owner == rank:
                back_out[r] += numel
            if r == rank:
                back_in[owner] += numel
    return ExchangePlan(group, rank, world, indices, owners, pieces, senders, out, into, back_out, back_in)


def _fingerprint(*parts: Any) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def _agree(group, key: tuple, device: torch.device) -> bool:
    """Whether every rank of ``group`` plans the same ``key``: one all-gather of 8 bytes."""
    world = dist.get_world_size(group)
    mine = torch.tensor([_fingerprint(key)], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    return all(bool((g == mine).all()) for g in gathered)


def _first_difference(group, shapes: Sequence[tuple], placements: Sequence[tuple]) -> str:
    summaries: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(summaries, (list(shapes), [repr(p) for p in placements]), group=group)
    mine = dist.get_rank(group)
    for r, (other_shapes, other_places) in enumerate(summaries):
        if (other_shapes, other_places) == summaries[mine]:
            continue
        if len(other_shapes) != len(shapes):
            return f"rank {mine} steps {len(shapes)} Muon matrices, rank {r} steps {len(other_shapes)}"
        for i, (a, b, pa, pb) in enumerate(zip(shapes, other_shapes, summaries[mine][1], other_places)):
            if (tuple(a), pa) != (tuple(b), pb):
                return f"matrix {i}: rank {mine} has shape {tuple(a)} {pa}, rank {r} has {tuple(b)} {pb}"
    return "another hyperparameter differs (Newton-Schulz cost or bucket size)"


_PLANS: dict[tuple, list[ExchangePlan] | None] = {}


def exchange_plans(mesh, shapes: Sequence[tuple[int, ...]], placements: Sequence[tuple], costs: Sequence[int],
                   bucket_numel: int, device: torch.device, *, strict: bool = True) -> list[ExchangePlan] | None:
    """The (cached) rounds of matrices of ``shapes`` with ``placements`` on ``mesh``.

    The first call for a layout checks it is the same on every rank of the mesh. On a
    mismatch ``strict`` raises ``ValueError``; otherwise it returns ``None`` (the caller
    falls back to smaller meshes), the same on every rank.
    """
    key = (mesh, tuple(tuple(s) for s in shapes), tuple(placements), tuple(costs), int(bucket_numel))
    if key in _PLANS and (_PLANS[key] is not None or not strict):
        return _PLANS[key]
    group = mesh_group(mesh)
    coords = group_coordinates(mesh, group)
    world, rank = len(coords), dist.get_rank(group)
    if world > 1 and not _agree(group, (key[1], tuple(repr(p) for p in placements), key[3], key[4]), device):
        if strict:
            raise ValueError(
                f"shardopt.Muon on DTensor parameters: the ranks of mesh {mesh} do not step the same matrices "
                f"({_first_difference(group, shapes, placements)}); every rank of a mesh must step the same "
                "Muon parameters in the same order, with gradients on all of them")
        _PLANS[key] = None
        return None
    numels = [int(torch.Size(s).numel()) for s in shapes]
    pieces = [[piece_of(shape, mesh.shape, c, place) for c in coords] for shape, place in zip(shapes, placements)]
    senders = [[is_sender(c, place) for c in coords] for place in placements]
    # Owning matrix i saves rank r its send (if it sends) and its return.
    saved = [[pieces[i][r].numel * (2 if senders[i][r] else 1) for r in range(world)] for i in range(len(shapes))]
    owners = assign_owners(costs, numels, world, saved)
    plans = [_round_plan(group, rank, world, indices, [owners[i] for i in indices], [pieces[i] for i in indices],
                         [senders[i] for i in indices])
             for indices in exchange_rounds(numels, world, bucket_numel)]
    if len(_PLANS) > 64:  # layouts change rarely; bound the cache all the same
        _PLANS.clear()
    _PLANS[key] = plans
    return plans
