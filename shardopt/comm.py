"""The only module that calls torch.distributed collectives.

Every collective the engine issues goes through :class:`Communicator`, which
also counts the bytes each rank sends (habit 6 of the design, after FSDP2's
``AllGather``/``ReduceScatter`` interfaces): a rename in torch lands here, and
``ZeroOptimizer.comm_stats()`` sees every call.

Byte accounting is per rank, for bandwidth-optimal (ring) algorithms, the
standard cost model (Thakur, Rabenseifner & Gropp 2005; the NCCL "bus
bandwidth" convention): with ``N`` ranks and a buffer of ``B`` bytes,
reduce-scatter and all-gather each send ``(N-1)/N * B``, all-reduce ``2(N-1)/N
* B``, and broadcast ``(N-1)/N * B`` per rank on average. ``benchmarks/`` checks
these against bytes measured on the wire.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.13 renamed the tensor collectives (the old names warn); older
# releases have only the old ones.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _Done:
    """Stands in for a collective's work handle when nothing had to be sent."""

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class _MeanOnWait:
    """Completes a reduction done by an all-to-all: the mean of the received copies.

    ``received`` holds the other ranks' copies, one after the other; with
    ``add_output`` the output already holds this rank's own copy, which joins them.
    """

    def __init__(self, work: Any, received: Tensor, output: Tensor | None, world_size: int,
                 *, add_output: bool) -> None:
        self.work, self.received, self.output, self.world_size = work, received, output, world_size
        self.add_output = add_output

    def wait(self) -> bool:
        if self.work is not None:
            self.work.wait()
            if self.output is not None and self.output.numel():
                copies = self.received.view(-1, self.output.numel())
                if self.add_output:
                    self.output.add_(copies.sum(dim=0))
                else:
                    torch.sum(copies, dim=0, out=self.output)
                self.output.div_(self.world_size)
            self.work = self.received = None
        return True


class Communicator:
    """Collectives over one process group (``None``: no group, one rank)."""

    def __init__(self, group: Any | None) -> None:
        self.group = group
        distributed = group is not None
        self.world_size = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        self.gloo = distributed and dist.get_backend(group) == "gloo"
        self.bytes_sent: Counter[str] = Counter()
        self.num_calls: Counter[str] = Counter()

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def _count(self, kind: str, nbytes: float) -> None:
        self.bytes_sent[kind] += int(nbytes)
        self.num_calls[kind] += 1

    def _share(self, nbytes: int) -> float:
        return nbytes * (self.world_size - 1) / self.world_size

    def global_rank(self, group_rank: int) -> int:
        if self.group is None or self.group is dist.GroupMember.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def reduce_scatter_avg(self, output: Tensor, flat: Tensor, *, async_op: bool = False):
        """``output`` (this rank's region) <- mean over ranks of ``flat``'s region."""
        if not self.active:
            output.copy_(flat)
            return _Done()
        self._count("reduce_scatter", self._share(flat.numel() * flat.element_size()))
        if self.gloo:
            # gloo has no native reduce-scatter: torch's gloo reduce_scatter_tensor
            # moves all-reduce volume (measured 1.50x the ideal on the wire at two
            # ranks). An all-to-all sends each region straight to its owner
            # ((N-1)/N of the buffer, the ideal) and the owner sums locally.
            received = torch.empty_like(flat)
            work = dist.all_to_all_single(received, flat, group=self.group, async_op=True)
            done = _MeanOnWait(work, received, output, self.world_size, add_output=False)
            if not async_op:
                done.wait()
            return done
        return _reduce_scatter_flat(
            output, flat, op=dist.ReduceOp.AVG, group=self.group, async_op=async_op
        )

    def reduce_avg(self, tensor: Tensor, dst: int, *, async_op: bool = False):
        """``tensor`` on rank ``dst`` <- mean over ranks of ``tensor`` (others' copies are scratch).

        Counted like a reduce-scatter's share of the same elements: with the
        reductions of all parts of a storage's matrices, each rank sends what a
        reduce-scatter of the storage would.
        """
        if not self.active:
            return _Done()
        self._count("reduce", self._share(tensor.numel() * tensor.element_size()))
        if self.gloo:
            # gloo's reduce moves more than the ideal (N-1) B in all (loopback bytes of a
            # 16 MiB reduce, benchmarks/bench_gloo_reduce.py: 2.25x at two ranks, 1.42x
            # at four): the other ranks send their copies straight to dst (one
            # all-to-all with only those parts non-empty; measured 1.00x), which sums them.
            numel, mine = tensor.numel(), dst == self.rank
            send = [numel if r == dst and not mine else 0 for r in range(self.world_size)]
            receive = [numel if mine and r != dst else 0 for r in range(self.world_size)]
            received = tensor.new_empty(sum(receive))
            work = dist.all_to_all_single(received, tensor if not mine else tensor.new_empty(0), receive, send,
                                          group=self.group, async_op=True)
            done = _MeanOnWait(work, received, tensor if mine else None, self.world_size, add_output=True)
            if not async_op:
                done.wait()
            return done
        return dist.reduce(tensor, self.global_rank(dst), op=dist.ReduceOp.AVG, group=self.group, async_op=async_op)

    def all_gather_inplace(self, flat: Tensor, *, async_op: bool = False):
        """Every rank's region of ``flat`` to every rank; this rank sends its own."""
        if not self.active:
            return _Done()
        region = flat.numel() // self.world_size
        local = flat[self.rank * region : (self.rank + 1) * region]
        self._count("all_gather", self._share(flat.numel() * flat.element_size()))
        return _all_gather_flat(flat, local, group=self.group, async_op=async_op)

    def all_gather_chunks(self, outputs: list[Tensor], local: Tensor, *, async_op: bool = False):
        """``outputs[r]`` <- rank ``r``'s ``local`` (equal sizes; ``local`` may be ``outputs[rank]``)."""
        if not self.active:
            return _Done()
        self._count("all_gather", self._share(sum(t.numel() for t in outputs) * local.element_size()))
        if self.gloo:
            return dist.all_gather(outputs, local, group=self.group, async_op=async_op)
        # NCCL gathers list outputs through one flat buffer anyway; do it here so the
        # bytes are sent once, then copy into the (non-adjacent) chunks.
        flat = torch.empty(len(outputs) * local.numel(), dtype=local.dtype, device=local.device)
        _all_gather_flat(flat, local, group=self.group)
        for output, piece in zip(outputs, flat.split(local.numel())):
            output.copy_(piece)
        return _Done()

    def exchange(self, send: Tensor, send_counts: list[int], receive_counts: list[int]) -> Tensor:
        """All-to-all with uneven parts: ``send_counts[r]`` elements of ``send`` go to rank ``r``;
        returns what every rank sent here, in rank order."""
        received = torch.empty(sum(receive_counts), dtype=send.dtype, device=send.device)
        if not self.active:
            received.copy_(send)
            return received
        mine = send_counts[self.rank]
        self._count("exchange", (sum(send_counts) - mine) * send.element_size())
        dist.all_to_all_single(received, send, receive_counts, send_counts, group=self.group)
        return received

    def all_gather_into(self, output: Tensor, local: Tensor) -> None:
        """``output`` (``world_size * local.numel()``) <- every rank's ``local``."""
        if not self.active:
            output.copy_(local.reshape(-1))
            return
        self._count("all_gather", self._share(output.numel() * output.element_size()))
        _all_gather_flat(output, local.reshape(-1), group=self.group)

    def all_reduce_avg(self, tensor: Tensor, *, async_op: bool = False):
        if not self.active:
            return _Done()
        self._count("all_reduce", 2 * self._share(tensor.numel() * tensor.element_size()))
        return dist.all_reduce(tensor, op=dist.ReduceOp.AVG, group=self.group, async_op=async_op)

    def all_reduce_sum(self, tensor: Tensor) -> None:
        if not self.active:
            return
        self._count("all_reduce", 2 * self._share(tensor.numel() * tensor.element_size()))
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)

    def broadcast(self, tensor: Tensor, src: int = 0) -> None:
        if not self.active:
            return
        self._count("broadcast", self._share(tensor.numel() * tensor.element_size()))
        dist.broadcast(tensor, src=self.global_rank(src), group=self.group)

    def all_gather_objects(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered


def default_group() -> Any | None:
    """The world group when torch.distributed is initialised, else ``None``."""
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def int64_digest(text: str, words: int = 4) -> list[int]:
    """A short fixed-size integer digest of ``text`` for comparing across ranks."""
    import hashlib

    digest = hashlib.sha256(text.encode()).digest()
    return [int.from_bytes(digest[i * 7 : (i + 1) * 7], "little") for i in range(words)]


def digest_tensor(text: str, device: torch.device) -> Tensor:
    return torch.tensor(int64_digest(text), dtype=torch.int64, device=device)
