"""Collectives on gloo, and the factory that picks a communicator's type from its group's backend.

:class:`~shardopt.zero.comm.Communicator` issues the native collectives
(NCCL, and any backend with a native reduce-scatter, reduce and flat
all-gather). gloo lacks some of them, or implements them with more traffic
than the ideal, so :class:`GlooCommunicator` replaces the backend step of
exactly three collectives (the public methods, with their byte counting, are
the base class's):

* :meth:`~Communicator.reduce_scatter_avg`: gloo has no native
  reduce-scatter; torch's gloo ``reduce_scatter_tensor`` moves all-reduce
  volume (measured 1.50x the ideal on the wire at two ranks). An all-to-all
  sends each region straight to its owner (the ideal), which sums locally.
* :meth:`~Communicator.reduce_avg`: gloo's reduce moves more than the ideal
  (loopback bytes of a 16 MiB reduce, ``benchmarks/bench_gloo_reduce.py``:
  2.25x at two ranks, 1.42x at four); an all-to-all to the destination
  measured 1.00x.
* :meth:`~Communicator.all_gather_chunks`: gloo gathers into a list of
  outputs directly (NCCL would go through one flat buffer anyway).

The local sums of both all-to-all reductions are done by :class:`_MeanOnWait`
in one fixed order (``docs/design/collectives.md``, rule 3). Everything else
(byte counting, the ownership and agreement checks, poisoning) is the base
class's, unchanged: these overrides call the same helpers in the same order.

:func:`communicator_for` chooses the type once, from the group's backend; the
rest of the engine sees only the :class:`Communicator` interface. The factory
lives here rather than in ``comm.py`` because ``comm.py`` must not import its
subclass (no module pair imports each other: ``tests/test_structure.py``).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

from .comm import Communicator
from .pool import BufferPool


class _MeanOnWait:
    """Completes a reduction done by an all-to-all: the mean of every rank's copy.

    ``received`` holds copies one after the other in rank order: every rank's
    (``own_rank=None``), or every rank's but ``own_rank``'s, whose copy is already
    in ``output``. The copies are summed in rank order, ``((c_0 + c_1) + c_2) ...``,
    then divided by the number of ranks: one fixed arithmetic whichever path
    (bucket reduce-scatter or per-matrix reduce) and whichever rank reduced, so a
    run is reproducible bit for bit and equals an unsharded optimizer given the
    same rank-ordered mean (the tests' oracle).
    """

    def __init__(self, work: Any, received: Tensor, output: Tensor | None, world_size: int,
                 *, own_rank: int | None, pool: BufferPool) -> None:
        self.work, self.received, self.output, self.world_size = work, received, output, world_size
        self.own_rank, self.pool = own_rank, pool

    def wait(self) -> bool:
        if self.work is not None:
            self.work.wait()
            output = self.output
            if output is not None and output.numel():
                copies = list(self.received.view(-1, output.numel()))
                if self.own_rank is None:
                    output.copy_(copies[0])
                    later = copies[1:]
                else:
                    before, later = copies[: self.own_rank], copies[self.own_rank :]
                    if before:
                        for copy in before[1:]:
                            before[0].add_(copy)  # scratch: the received buffer
                        output.add_(before[0])  # a + b == b + a in IEEE arithmetic
                for copy in later:
                    output.add_(copy)
                output.div_(self.world_size)
            self.pool.give(self.received)
            self.work = self.received = None
        return True


class GlooCommunicator(Communicator):
    """:class:`Communicator` on a gloo group: reduce-scatter and reduce as all-to-alls, list all-gather."""

    def _reduce_scatter(self, output: Tensor, flat: Tensor, async_op: bool):
        # gloo has no native reduce-scatter: torch's gloo reduce_scatter_tensor
        # moves all-reduce volume (measured 1.50x the ideal on the wire at two
        # ranks). An all-to-all sends each region straight to its owner
        # ((N-1)/N of the buffer, the ideal) and the owner sums locally.
        self._agree("all_to_all", flat.dtype, flat.numel())
        claim = self._claim("reduce-scatter", [output, flat])
        received = self.pool.take(flat.numel(), flat.dtype, flat.device, kind="receive")
        work = dist.all_to_all_single(received, flat, group=self.group, async_op=True)
        done = _MeanOnWait(self._own(work, claim), received, output, self.world_size, own_rank=None, pool=self.pool)
        if not async_op:
            done.wait()
        return done

    def _reduce(self, tensor: Tensor, dst: int, async_op: bool):
        # gloo's reduce moves more than the ideal (N-1) B in all (loopback bytes of a
        # 16 MiB reduce, benchmarks/bench_gloo_reduce.py: 2.25x at two ranks, 1.42x
        # at four): the other ranks send their copies straight to dst (one
        # all-to-all with only those parts non-empty; measured 1.00x), which sums them.
        numel, mine = tensor.numel(), dst == self.rank
        send = [numel if r == dst and not mine else 0 for r in range(self.world_size)]
        receive = [numel if mine and r != dst else 0 for r in range(self.world_size)]
        self._agree("all_to_all", tensor.dtype, numel, send, receive)
        received = self.pool.take(sum(receive), tensor.dtype, tensor.device, kind="receive")
        claim = self._claim("reduce", [tensor])
        work = dist.all_to_all_single(received, tensor if not mine else tensor.new_empty(0), receive, send,
                                      group=self.group, async_op=True)
        done = _MeanOnWait(self._own(work, claim), received, tensor if mine else None, self.world_size,
                           own_rank=dst, pool=self.pool)
        if not async_op:
            done.wait()
        return done

    def _gather_chunks(self, outputs: list[Tensor], local: Tensor, async_op: bool):
        claim = self._claim("all-gather", outputs)
        # gloo's list all-gather fills the (non-adjacent) chunks itself and can run
        # asynchronously (the base class's flat path waits before copying out).
        work = dist.all_gather(outputs, local, group=self.group, async_op=async_op)
        return self._own(work, claim) if async_op else work


def communicator_for(group: Any | None, *, check: bool | None = None, poison: bool | None = None) -> Communicator:
    """The communicator for ``group``, its type chosen once from the group's backend.

    :class:`GlooCommunicator` for a gloo group; :class:`Communicator` (native
    collectives) for any other backend and for ``group=None`` (no group, one rank).
    ``check`` and ``poison`` are :class:`Communicator`'s.
    """
    if group is not None and dist.get_backend(group) == "gloo":
        return GlooCommunicator(group, check=check, poison=poison)
    return Communicator(group, check=check, poison=poison)
