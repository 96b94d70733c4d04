"""Where each rank's local shard of a DTensor sits in the whole tensor, for any rank.

The distributed matrix step (:mod:`shardopt.dtensor.muon`) assembles a whole
matrix on its owner from every rank's local shard, and cuts the result back into
the same pieces. The geometry is DTensor's own: the sizes and offsets come from
``torch.distributed.tensor._utils`` (``_compute_local_shape_and_global_offset``,
the coordinate-taking form of ``compute_local_shape_and_global_offset``, and,
for ``_StridedShard``, the per-dimension global indices of
``_get_shard_size_and_offsets`` that it composes), evaluated at every mesh
coordinate, so nothing assumes contiguous dim-0 chunks: uneven and empty shards,
``Shard(1)``, several mesh dimensions on one tensor dimension and strided shards
all come out of the same code that lays the shards out.

Each placement cuts one tensor dimension, so a local shard is the Cartesian
product of one index set per dimension: a range (a slice, read and written as a
view) or, under ``_StridedShard``, an index list (advanced indexing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Piece:
    """One rank's local shard of a tensor of global shape ``global_shape``.

    ``index`` has one entry per dimension: a ``slice`` (a contiguous range) or a
    1-D CPU tensor of global indices (a strided shard).
    """

    shape: tuple[int, ...]
    index: tuple[slice | Tensor, ...]
    _device_index: dict[torch.device, tuple[Tensor, ...]] = field(default_factory=dict, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def _key(self, device: torch.device) -> tuple[slice | Tensor, ...]:
        if all(isinstance(i, slice) for i in self.index):
            return self.index
        if device not in self._device_index:
            # Broadcastable index tensors: dimension d varies along axis d only.
            ndim, parts = len(self.index), []
            for dim, (entry, size) in enumerate(zip(self.index, self.shape)):
                ids = torch.arange(entry.start, entry.start + size) if isinstance(entry, slice) else entry
                view = [1] * ndim
                view[dim] = -1
                parts.append(ids.reshape(view).to(device))
            self._device_index[device] = tuple(parts)
        return self._device_index[device]

    def read(self, full: Tensor) -> Tensor:
        """This piece of ``full`` (a view when every dimension is a range)."""
        return full[self._key(full.device)]

    def write(self, full: Tensor, values: Tensor) -> None:
        """``full``'s elements of this piece <- ``values`` (in the local shard's shape)."""
        key = self._key(full.device)
        if all(isinstance(i, slice) for i in key):
            full[key].copy_(values.reshape(self.shape))
        else:
            full[key] = values.reshape(self.shape).to(full.dtype)


def piece_of(global_shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int],
             placements: Sequence) -> Piece:
    """The local shard that the rank at ``coordinate`` of a mesh of ``mesh_shape`` holds."""
    from torch.distributed.tensor import Partial
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import Shard, _StridedShard

    if any(isinstance(p, Partial) for p in placements):
        raise ValueError(f"placements {tuple(placements)}: a Partial tensor has no pieces to assemble")
    global_shape, coordinate = tuple(global_shape), list(coordinate)
    shape, offset = _compute_local_shape_and_global_offset(global_shape, tuple(mesh_shape), coordinate, placements)
    if not any(isinstance(p, _StridedShard) for p in placements):
        return Piece(tuple(shape), tuple(slice(o, o + s) for o, s in zip(offset, shape)))
    # Strided shards are not boxes: compose the global indices dimension by dimension,
    # as torch's own helper does (left to right over the mesh dimensions).
    from torch.distributed.tensor._utils import _get_shard_size_and_offsets

    indices: dict[int, Tensor] = {}
    local = list(global_shape)
    for mesh_dim, placement in enumerate(placements):
        if not isinstance(placement, (Shard, _StridedShard)):
            continue
        dim = placement.dim
        size, ids = _get_shard_size_and_offsets(local[dim], mesh_shape[mesh_dim], coordinate[mesh_dim], placement,
                                                indices.get(dim), global_shape[dim], False)
        local[dim] = size
        indices[dim] = ids[:size]  # an empty shard's helper returns one sentinel offset
    if tuple(local) != tuple(shape):
        raise AssertionError(f"strided shard geometry {local} disagrees with DTensor's {shape}")
    index: list[slice | Tensor] = []
    for dim, size in enumerate(local):
        ids = indices.get(dim)
        if ids is None:
            index.append(slice(0, size))
        elif size and bool((ids == torch.arange(int(ids[0]), int(ids[0]) + size)).all()):
            index.append(slice(int(ids[0]), int(ids[0]) + size))
        else:
            index.append(ids.to(torch.long))
    return Piece(tuple(local), tuple(index))


def mesh_group(mesh) -> dist.ProcessGroup | None:
    """One process group over every rank of ``mesh`` (``None``: the default group)."""
    if mesh.size() == dist.get_world_size():
        return None
    if mesh.ndim == 1:
        return mesh.get_group()
    return mesh._flatten().get_group()  # an N-D mesh as one group: one collective, not one per dim


def group_coordinates(mesh, group: dist.ProcessGroup | None) -> list[tuple[int, ...]]:
    """The mesh coordinate of each rank of ``group``, in group-rank order.

    Read through the global ranks rather than assumed: a group's rank order is the
    backend's, and need not be the mesh's row-major order.
    """
    where = {int(r): tuple(int(c) for c in coord)
             for coord, r in zip(torch.cartesian_prod(*[torch.arange(n) for n in mesh.shape]).reshape(
                 -1, mesh.ndim).tolist(), mesh.mesh.reshape(-1).tolist())}
    size = dist.get_world_size(group)
    global_ranks = [r if group is None else dist.get_global_rank(group, r) for r in range(size)]
    return [where[g] for g in global_ranks]


def is_sender(coordinate: Sequence[int], placements: Sequence) -> bool:
    """Whether the rank at ``coordinate`` sends its piece: of ranks holding the same
    piece (differing only along ``Replicate`` mesh dimensions) the one at 0 there."""
    return all(c == 0 for c, p in zip(coordinate, placements) if p.is_replicate())
