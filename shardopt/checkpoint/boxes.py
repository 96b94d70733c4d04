"""A rank's contiguous range of a flattened tensor as rectangular boxes, for DCP.

DCP describes every saved piece of a tensor as a box of the logical tensor
(``ChunkStorageMetadata``: offsets and sizes per dimension), checks at save that
the boxes of all ranks cover it exactly, and reshards on load by intersecting
the saved boxes with the loader's
(https://pytorch.org/docs/stable/distributed.checkpoint.html). A ZeRO area holds
elements ``[start, end)`` of a parameter flattened in row-major order, which
can begin and end mid-row. That range is the union of at most ``2(ndim-1)+1``
boxes, each itself contiguous in the flat order::

    shape (R, C), range [a, b):   row a//C from column a%C      (partial row)
                                  rows ceil(a/C) .. b//C - 1    (whole rows)
                                  row b//C up to column b%C     (partial row)

applied recursively to the partial rows of an N-D tensor. Each box is a view
of the area, so saving copies nothing and loading writes into the area.

Several boxes per rank are carried by a ``DTensor`` whose local tensor is
``torch.distributed.tensor._shards_wrapper.LocalShardsWrapper``: DCP asks the
DTensor for ``__create_write_items__`` (save), ``__create_chunk_list__``
(load planning) and ``__get_tensor_shard__`` (the tensor a read lands in), and
the DTensor forwards all three to the wrapper, which answers with one item per
box. (A plain DTensor with uneven ``Shard(0)`` pieces saves but fails to load,
and 1-D flattened keys do not match other frameworks' shapes.) The wrapper is
private to torch; this module is the only code that touches it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Box:
    """Elements ``[start, start + numel)`` of the flattened tensor are the box ``offsets`` + ``sizes``."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    start: int

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


def boxes(shape: tuple[int, ...], start: int, end: int) -> list[Box]:
    """The boxes whose union is elements ``[start, end)`` of a row-major tensor of ``shape``,
    in flat order (at most ``2(len(shape)-1)+1`` of them)."""
    if start >= end:
        return []
    if len(shape) <= 1:
        return [Box((start,), (end - start,), start)] if shape else [Box((), (), 0)]
    row = math.prod(shape[1:])
    first, last = start // row, end // row
    inner = tuple(shape[1:])

    def in_row(r: int, low: int, high: int) -> list[Box]:
        return [Box((r, *b.offsets), (1, *b.sizes), r * row + b.start) for b in boxes(inner, low, high)]

    if first == last:
        return in_row(first, start - first * row, end - first * row)
    out = []
    if start % row:
        out += in_row(first, start % row, row)
        first += 1
    if last > first:
        out.append(Box((first,) + (0,) * len(inner), (last - first, *inner), first * row))
    if end % row:
        out += in_row(last, 0, end % row)
    return out


def ravel(offsets: tuple[int, ...], shape: tuple[int, ...]) -> int:
    """Flat (row-major) index of the element at ``offsets``."""
    index = 0
    for offset, size in zip(offsets, shape):
        index = index * size + offset
    return index


def sharded_view(flat: Tensor, shape: tuple[int, ...], start: int, mesh: Any | None) -> Tensor:
    """``flat`` holds elements ``[start, start + flat.numel())`` of a tensor of ``shape``: return it
    as what DCP saves and loads in place.

    Without a mesh (one rank) the range must be the whole tensor: a plain view.
    With one, a ``DTensor`` over a ``LocalShardsWrapper`` of the range's boxes;
    a rank holding none of the tensor gives one empty box, so that every rank
    has every key (as FSDP2's state dicts do).
    """
    shape = tuple(shape)
    if mesh is None:
        if start != 0 or flat.numel() != math.prod(shape):
            raise ValueError(f"Invalid range: elements [{start}, {start + flat.numel()}) of a tensor of shape "
                             f"{shape} on one rank (expected the whole tensor)")
        return flat.view(shape)
    found = boxes(shape, start, start + flat.numel())
    shards = [flat[b.start - start : b.start - start + b.numel].view(b.sizes) for b in found]
    offsets = [torch.Size(b.offsets) for b in found]
    if not shards:
        # Placed past the last row: DCP's save planner merges write items of equal offsets
        # across ranks (replicated tensors), and would keep an empty box for a real one.
        shards = [flat[:0].view((0, *shape[1:]))]
        offsets = [torch.Size((shape[0],) + (0,) * (len(shape) - 1))]
    return _wrap(shards, offsets, shape, mesh)


def _wrap(shards: list[Tensor], offsets: list[torch.Size], shape: tuple[int, ...], mesh: Any) -> Tensor:
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper

    wrapper = LocalShardsWrapper(shards, offsets)
    stride = torch.empty(shape, device="meta").stride()
    # The placement is nominal: DCP reads the boxes from the wrapper, never from the placement.
    return DTensor.from_local(wrapper, mesh, [Shard(0)], shape=torch.Size(shape), stride=stride, run_check=False)


def staged_copy(value: Any) -> Any:
    """A CPU copy of a state dict for ``dcp.async_save``, boxes kept.

    torch's default stager rebuilds a DTensor's local tensor as one plain tensor
    of the wrapper's nominal size, which loses the boxes; this copies each box.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper

    if isinstance(value, dict):
        return {key: staged_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [staged_copy(item) for item in value]
    if isinstance(value, DTensor) and isinstance(value._local_tensor, LocalShardsWrapper):
        local = value._local_tensor
        shards = [shard.detach().to("cpu", copy=True) for shard in local.local_shards()]
        offsets = [torch.Size(chunk.offsets) for chunk in local.local_chunks]
        return _wrap(shards, offsets, tuple(value.shape), value.device_mesh)
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    return value


def local_pieces(value: Tensor) -> list[tuple[int, Tensor]]:
    """``(flat start, flat tensor)`` of every piece of ``value`` this rank holds: one for a plain
    tensor (the whole of it), one per box for :func:`sharded_view`'s DTensors.

    Raises ``TypeError`` for other distributed tensors (FSDP2 ``Shard(0)``
    DTensors are the FSDP2 path's to add).
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper

    if not isinstance(value, DTensor):
        return [(0, value.reshape(-1))]
    local = value._local_tensor
    if not isinstance(local, LocalShardsWrapper):
        raise TypeError(f"Invalid state tensor: a DTensor with placements {value.placements} over a "
                        f"{type(local).__name__} (expected shardopt's boxes or a plain tensor)")
    shape = tuple(value.shape)
    return [(ravel(tuple(chunk.offsets), shape), shard.reshape(-1))
            for shard, chunk in zip(local.local_shards(), local.local_chunks) if shard.numel()]


def copies_into(target: Tensor, start: int, value: Tensor) -> list[tuple[Tensor, Tensor]] | None:
    """The ``(destination, source)`` copies that fill ``target`` (elements ``[start, start +
    target.numel())`` of the flattened tensor) from ``value``'s local pieces; ``None`` when they
    do not cover it. Pieces that already are ``target``'s memory are skipped (nothing to copy)."""
    end, covered, out = start + target.numel(), 0, []
    for piece_start, piece in local_pieces(value):
        low, high = max(start, piece_start), min(end, piece_start + piece.numel())
        if low >= high:
            continue
        covered += high - low
        dst = target[low - start : high - start]
        src = piece[low - piece_start : high - piece_start]
        if dst.data_ptr() != src.data_ptr() or dst.dtype != src.dtype or dst.device != src.device:
            out.append((dst, src))
    return out if covered == target.numel() else None
