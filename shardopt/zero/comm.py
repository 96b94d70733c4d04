"""The module that calls torch.distributed collectives (with its gloo subclass, ``comm_gloo.py``).

Every collective the engine issues goes through :class:`Communicator`, which
also counts the bytes each rank sends (habit 6 of the design, after FSDP2's
``AllGather``/``ReduceScatter`` interfaces): a rename in torch lands here, and
``ZeroOptimizer.comm_stats()`` sees every call.

**Backends.** :class:`Communicator` issues the native collectives: NCCL, and
any backend with a native reduce-scatter, reduce and flat all-gather. The
backend difference is a type, not a flag:
:class:`~shardopt.zero.comm_gloo.GlooCommunicator` overrides
:meth:`~Communicator.reduce_scatter_avg`, :meth:`~Communicator.reduce_avg` and
:meth:`~Communicator.all_gather_chunks` because gloo lacks a native
reduce-scatter (torch's gloo ``reduce_scatter_tensor`` moves all-reduce
volume, measured 1.50x the ideal at two ranks) and its reduce moves more than
the ideal (2.25x at two ranks, 1.42x at four, ``benchmarks/bench_gloo_reduce.py``);
it does both as all-to-alls plus a local sum (1.00x). Build a communicator
with :func:`~shardopt.zero.comm_gloo.communicator_for`, which picks the type
once from the group's backend; constructing :class:`Communicator` directly
means the native collectives.

Byte accounting is per rank, for bandwidth-optimal (ring) algorithms, the
standard cost model (Thakur, Rabenseifner & Gropp 2005; the NCCL "bus
bandwidth" convention): with ``N`` ranks and a buffer of ``B`` bytes,
reduce-scatter and all-gather each send ``(N-1)/N * B``, all-reduce ``2(N-1)/N
* B``, and broadcast ``(N-1)/N * B`` per rank on average. ``benchmarks/`` checks
these against bytes measured on the wire.

Two guarantees hold for every collective issued here (``docs/design/collectives.md``):

* **Ownership.** A buffer that an asynchronous collective reads or writes
  belongs to that one operation from launch until its ``wait()``: a second
  collective touching any byte of it raises :class:`BufferOwnershipError`
  naming both. Always on (a few in flight at a time; the check is a scan).
* **Agreement** (``SHARDOPT_CHECK_COLLECTIVES=1`` or ``Communicator(check=True)``;
  one extra small all-gather per collective): before each collective the ranks
  compare its kind, dtype and element counts (for an all-to-all: what each
  sends to each) and raise :class:`CollectiveMismatchError` on the first
  difference instead of exchanging misread bytes.
* **Failures named.** A collective that fails on this rank (a peer died: gloo's
  "Connection closed by peer"; or stalled past the process group's timeout,
  ``SHARDOPT_TIMEOUT_S`` under :func:`shardopt.dist.init_from_env`) raises
  :class:`CollectiveFailure`, naming the operation, this rank and the timeout,
  with the backend's error as its cause.
* **Poisoning** (``SHARDOPT_POISON_BUFFERS=1`` or ``Communicator(poison=True)``;
  one fill per buffer): receive and gradient buffers start as NaN rather than
  uninitialised memory, and buffers handed back through :meth:`retire` are
  filled with NaN, so a read of an unwritten or recycled element shows up as
  NaN at once, the same on every run.

The test suite turns both on (``tests/conftest.py``, per spawned job where the
check is affordable).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .policy import GATHERS_IN_FLIGHT
from .pool import BufferPool, new_buffer

# torch 2.13 renamed the tensor collectives (the old names warn); older
# releases have only the old ones.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


CHECK_ENV = "SHARDOPT_CHECK_COLLECTIVES"
POISON_ENV = "SHARDOPT_POISON_BUFFERS"
# Stable codes for the dtypes a collective may carry (compared across ranks).
_DTYPE_CODES = {dtype: code for code, dtype in enumerate(
    (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
     torch.int8, torch.bool))}


def flag_from_env(name: str) -> bool:
    """Whether environment variable ``name`` is set to ``1``, ``true``, ``yes`` or ``on``."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class BufferOwnershipError(RuntimeError):
    """A collective touched a buffer that an in-flight asynchronous collective still owns."""


class CollectiveFailure(RuntimeError):
    """A collective failed on this rank: another rank died or stalled past the timeout, or the
    transport failed. The backend's own error is the ``__cause__``."""


@contextlib.contextmanager
def naming_failures(op: str, rank: int, world_size: int) -> Iterator[None]:
    """Re-raise a backend error inside the block as :class:`CollectiveFailure` naming ``op``."""
    try:
        yield
    except (BufferOwnershipError, CollectiveMismatchError, CollectiveFailure):
        raise
    except RuntimeError as error:  # gloo / NCCL raise RuntimeError (DistBackendError) subclasses
        raise CollectiveFailure(
            f"shardopt: {op} failed on rank {rank} of {world_size}: another rank likely died or stalled past "
            f"the collective timeout (SHARDOPT_TIMEOUT_S with shardopt.dist.init_from_env, else "
            f"init_process_group(timeout=...)); the backend said: {error}") from error


def _names_failures(op: str) -> Callable:
    """Method decorator: :func:`naming_failures` around a Communicator collective."""
    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        def call(self: Communicator, *args: Any, **kwargs: Any) -> Any:
            with naming_failures(op, self.rank, self.world_size):
                return method(self, *args, **kwargs)
        return call
    return decorate


class CollectiveMismatchError(RuntimeError):
    """Ranks issued collectives that disagree (kind, dtype or counts): they would misread bytes or hang."""


def _byte_range(tensor: Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, end byte) that ``tensor`` may touch."""
    storage = tensor.untyped_storage()
    size = tensor.element_size()
    start = tensor.storage_offset() * size
    if tensor.numel() == 0:
        return storage.data_ptr(), start, start
    span = 1 + sum((n - 1) * abs(st) for n, st in zip(tensor.shape, tensor.stride()))
    return storage.data_ptr(), start, start + span * size


class _Owned:
    """A work handle whose buffers stay owned until :meth:`wait` returns."""

    def __init__(self, work: Any, comm: Communicator, claim: list[tuple[int, int, int, str]]) -> None:
        self.work, self.comm, self.claim = work, comm, claim

    def wait(self) -> bool:
        if self.work is not None:
            op = self.claim[0][3] if self.claim else "collective"
            with naming_failures(op, self.comm.rank, self.comm.world_size):
                self.work.wait()
            self.comm._release(self.claim)
            self.work = None
        return True

    def is_completed(self) -> bool:
        return self.work is None or self.work.is_completed()


class _CopyOutOnWait:
    """Completes an all-gather into a pooled flat buffer: its pieces to their chunks, then the buffer back."""

    def __init__(self, work: _Owned, flat: Tensor, outputs: list[Tensor], pool: BufferPool) -> None:
        self.work, self.flat, self.outputs, self.pool = work, flat, outputs, pool

    def wait(self) -> bool:
        if self.flat is not None:
            self.work.wait()
            for output, piece in zip(self.outputs, self.flat.split(self.outputs[0].numel())):
                output.copy_(piece)
            self.pool.give(self.flat)
            self.flat = None
        return True

    def is_completed(self) -> bool:
        return self.flat is None or self.work.is_completed()


class _Done:
    """Stands in for a collective's work handle when nothing had to be sent."""

    def wait(self) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


class Communicator:
    """Collectives over one process group (``None``: no group, one rank), native implementation.

    On gloo use :class:`~shardopt.zero.comm_gloo.GlooCommunicator`
    (:func:`~shardopt.zero.comm_gloo.communicator_for` picks it).
    """

    def __init__(self, group: Any | None, *, check: bool | None = None, poison: bool | None = None) -> None:
        if group is not None and type(self) is Communicator and dist.get_backend(group) == "gloo":
            raise TypeError("Communicator: a gloo group needs GlooCommunicator (gloo lacks the native "
                            "collectives); build one with shardopt.zero.comm_gloo.communicator_for(group)")
        self.group = group
        distributed = group is not None
        self.world_size = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        self.check = flag_from_env(CHECK_ENV) if check is None else check
        self.poison = flag_from_env(POISON_ENV) if poison is None else poison
        self.bytes_sent: Counter[str] = Counter()
        self.num_calls: Counter[str] = Counter()
        # (storage address, first byte, end byte, operation) of buffers owned by
        # asynchronous collectives not yet waited for.
        self._owned: list[tuple[int, int, int, str]] = []
        self._num_checked = 0
        # Buffers reused step after step: the engine's gradient buffers ("reduce",
        # "cast") and this communicator's own staging ("receive", "gather").
        self.pool = BufferPool(poison=self.poison, check=self._returnable)
        self._gathers: list[_CopyOutOnWait] = []  # native chunked all-gathers not yet copied out

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

    # ------------------------------------------------------------ guarantees

    def _claim(self, op: str, tensors: list[Tensor]) -> list[tuple[int, int, int, str]]:
        """Raise if any of ``tensors`` overlaps a buffer an in-flight collective owns; else the
        claim that :meth:`_own` registers once the collective is issued."""
        claim = []
        for tensor in tensors:
            address, low, high = _byte_range(tensor)
            if low == high:
                continue
            for other_address, other_low, other_high, other_op in self._owned:
                if address == other_address and low < other_high and other_low < high:
                    raise BufferOwnershipError(
                        f"{op} touches bytes [{low}, {high}) of a buffer that the in-flight {other_op} still "
                        f"owns (bytes [{other_low}, {other_high})); wait for it before reusing the buffer"
                    )
            claim.append((address, low, high, op))
        return claim

    def _own(self, work: Any, claim: list[tuple[int, int, int, str]]) -> _Owned:
        """``work``'s buffers (``claim``) stay owned until its ``wait()``."""
        self._owned.extend(claim)
        return _Owned(work, self, claim)

    def _release(self, claim: list[tuple[int, int, int, str]]) -> None:
        for item in claim:
            self._owned.remove(item)

    @property
    def num_in_flight_buffers(self) -> int:
        """Buffers owned by asynchronous collectives not yet waited for."""
        return len(self._owned)

    def _agree(self, kind: str, dtype: torch.dtype, numel: int,
               send_counts: list[int] | None = None, receive_counts: list[int] | None = None) -> None:
        """With ``check``: raise :class:`CollectiveMismatchError` unless every rank issues the same collective."""
        if not (self.check and self.active):
            return
        world = self.world_size
        kinds = ("all_to_all", "all_gather", "all_reduce", "broadcast", "reduce_scatter", "reduce")
        mine = [kinds.index(kind), _DTYPE_CODES.get(dtype, -1), numel]
        mine += list(send_counts or [-1] * world) + list(receive_counts or [-1] * world)
        local = torch.tensor(mine, dtype=torch.int64, device=self._device())
        gathered = torch.empty(world * local.numel(), dtype=torch.int64, device=local.device)
        _all_gather_flat(gathered, local, group=self.group)
        table = gathered.view(world, -1).tolist()
        self._num_checked += 1
        names = {code: str(d).removeprefix("torch.") for d, code in _DTYPE_CODES.items()}

        def describe(row: list[int]) -> str:
            text = f"{kinds[row[0]]} of {row[2]} {names.get(row[1], 'other dtype')} elements"
            if row[3] >= 0:
                text += f", sending {row[3 : 3 + world]}, receiving {row[3 + world :]}"
            return text

        problem = None
        if any(row[:2] != table[0][:2] for row in table):
            problem = "kind or dtype"
        elif send_counts is None and any(row[2] != table[0][2] for row in table):
            problem = "element count"
        elif send_counts is not None and any(
            table[src][3 + dst] != table[dst][3 + world + src] for src in range(world) for dst in range(world)
        ):
            problem = "what one rank sends and its peer expects"
        if problem is not None:
            detail = "; ".join(f"rank {r}: {describe(row)}" for r, row in enumerate(table))
            raise CollectiveMismatchError(
                f"collective #{self._num_checked} differs between ranks in its {problem}: {detail}"
            )

    def _device(self) -> torch.device:
        if self.group is not None and dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def empty(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A buffer a collective will fill: uninitialised, or NaN with ``poison``."""
        return new_buffer(numel, dtype, device, poison=self.poison)

    def _returnable(self, tensor: Tensor) -> None:
        """Raise :class:`BufferOwnershipError` if an in-flight collective still owns ``tensor``."""
        self._claim("returning a buffer to the pool", [tensor])

    def retire(self, tensor: Tensor | None) -> None:
        """``tensor`` is no longer anyone's: with ``poison``, fill it with NaN so a stale reader sees NaN."""
        if self.poison and tensor is not None and tensor.is_floating_point():
            self._claim("a retired buffer's poisoning", [tensor])
            tensor.fill_(float("nan"))

    # ------------------------------------------------------------ collectives

    @_names_failures("reduce-scatter")
    def reduce_scatter_avg(self, output: Tensor, flat: Tensor, *, async_op: bool = False):
        """``output`` (this rank's region) <- mean over ranks of ``flat``'s region."""
        if not self.active:
            output.copy_(flat)
            return _Done()
        self._count("reduce_scatter", self._share(flat.numel() * flat.element_size()))
        return self._reduce_scatter(output, flat, async_op)

    def _reduce_scatter(self, output: Tensor, flat: Tensor, async_op: bool):
        """The native reduce-scatter (mean); subclasses replace it for their backend."""
        self._agree("reduce_scatter", flat.dtype, flat.numel())
        claim = self._claim("reduce-scatter", [output, flat])
        work = _reduce_scatter_flat(output, flat, op=dist.ReduceOp.AVG, group=self.group, async_op=async_op)
        return self._own(work, claim) if async_op else work

    @_names_failures("reduce")
    def reduce_avg(self, tensor: Tensor, dst: int, *, async_op: bool = False):
        """``tensor`` on rank ``dst`` <- mean over ranks of ``tensor`` (others' copies are scratch).

        Counted like a reduce-scatter's share of the same elements: with the
        reductions of all parts of a storage's matrices, each rank sends what a
        reduce-scatter of the storage would.
        """
        if not self.active:
            return _Done()
        self._count("reduce", self._share(tensor.numel() * tensor.element_size()))
        return self._reduce(tensor, dst, async_op)

    def _reduce(self, tensor: Tensor, dst: int, async_op: bool):
        """The native reduce (mean) to ``dst``; subclasses replace it for their backend."""
        self._agree("reduce", tensor.dtype, tensor.numel())
        claim = self._claim("reduce", [tensor])
        work = dist.reduce(tensor, self.global_rank(dst), op=dist.ReduceOp.AVG, group=self.group, async_op=async_op)
        return self._own(work, claim) if async_op else work

    @_names_failures("all-gather")
    def all_gather_inplace(self, flat: Tensor, *, async_op: bool = False):
        """Every rank's region of ``flat`` to every rank; this rank sends its own."""
        if not self.active:
            return _Done()
        region = flat.numel() // self.world_size
        local = flat[self.rank * region : (self.rank + 1) * region]
        self._count("all_gather", self._share(flat.numel() * flat.element_size()))
        self._agree("all_gather", flat.dtype, flat.numel())
        claim = self._claim("all-gather", [flat])
        work = _all_gather_flat(flat, local, group=self.group, async_op=async_op)
        return self._own(work, claim) if async_op else work

    @_names_failures("all-gather")
    def all_gather_chunks(self, outputs: list[Tensor], local: Tensor, *, async_op: bool = False):
        """``outputs[r]`` <- rank ``r``'s ``local`` (equal sizes; ``local`` may be ``outputs[rank]``)."""
        if not self.active:
            return _Done()
        self._count("all_gather", self._share(sum(t.numel() for t in outputs) * local.element_size()))
        self._agree("all_gather", local.dtype, local.numel() * len(outputs))
        return self._gather_chunks(outputs, local, async_op)

    def _gather_chunks(self, outputs: list[Tensor], local: Tensor, async_op: bool):
        """The native all-gather into separate chunks; subclasses replace it for their backend.

        NCCL gathers list outputs through one flat buffer anyway; gathering into a
        pooled flat buffer here sends the bytes once, and the copy into the
        (non-adjacent) chunks runs at ``wait()``, so chunked all-gathers overlap
        like flat ones and allocate nothing after the first step.
        """
        claim = self._claim("all-gather", outputs)
        # At most GATHERS_IN_FLIGHT staging buffers: launching one more first completes
        # the oldest (collectives complete in launch order, so that wait costs no overlap
        # the window allows), else a step's gathers would stage a whole model's parameters.
        self._gathers = [g for g in self._gathers if g.flat is not None]
        while len(self._gathers) >= GATHERS_IN_FLIGHT:
            self._gathers.pop(0).wait()
        flat = self.pool.take(len(outputs) * local.numel(), local.dtype, local.device, kind="gather")
        work = _all_gather_flat(flat, local, group=self.group, async_op=True)
        done = _CopyOutOnWait(self._own(work, claim), flat, outputs, self.pool)
        self._gathers.append(done)
        if not async_op:
            done.wait()
        return done

    @_names_failures("all-to-all")
    def exchange(self, send: Tensor, send_counts: list[int], receive_counts: list[int], dtype: torch.dtype) -> Tensor:
        """All-to-all with uneven parts: ``send_counts[r]`` elements of ``send`` go to rank ``r``;
        returns what every rank sent here, in rank order.

        ``dtype`` is what travels: it must be the same on every rank, so it is
        given, not read off ``send`` (a rank with nothing to send has no data
        to read it from).
        """
        if send.dtype != dtype:
            raise TypeError(f"exchange: send buffer is {send.dtype}, the exchange carries {dtype}")
        received = self.empty(sum(receive_counts), dtype, send.device)
        if not self.active:
            received.copy_(send)
            return received
        mine = send_counts[self.rank]
        self._count("exchange", (sum(send_counts) - mine) * send.element_size())
        self._agree("all_to_all", dtype, send.numel(), send_counts, receive_counts)
        self._claim("exchange", [send])
        dist.all_to_all_single(received, send, receive_counts, send_counts, group=self.group)
        return received

    @_names_failures("all-gather")
    def all_gather_into(self, output: Tensor, local: Tensor) -> None:
        """``output`` (``world_size * local.numel()``) <- every rank's ``local``."""
        if not self.active:
            output.copy_(local.reshape(-1))
            return
        self._count("all_gather", self._share(output.numel() * output.element_size()))
        self._agree("all_gather", output.dtype, output.numel())
        self._claim("all-gather", [output, local])
        _all_gather_flat(output, local.reshape(-1), group=self.group)

    @_names_failures("all-reduce")
    def all_reduce_avg(self, tensor: Tensor, *, async_op: bool = False):
        if not self.active:
            return _Done()
        self._count("all_reduce", 2 * self._share(tensor.numel() * tensor.element_size()))
        self._agree("all_reduce", tensor.dtype, tensor.numel())
        claim = self._claim("all-reduce", [tensor])
        work = dist.all_reduce(tensor, op=dist.ReduceOp.AVG, group=self.group, async_op=async_op)
        return self._own(work, claim) if async_op else work

    @_names_failures("all-reduce")
    def all_reduce_sum(self, tensor: Tensor) -> None:
        if not self.active:
            return
        self._count("all_reduce", 2 * self._share(tensor.numel() * tensor.element_size()))
        self._agree("all_reduce", tensor.dtype, tensor.numel())
        self._claim("all-reduce", [tensor])
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)

    @_names_failures("broadcast")
    def broadcast(self, tensor: Tensor, src: int = 0) -> None:
        if not self.active:
            return
        self._count("broadcast", self._share(tensor.numel() * tensor.element_size()))
        self._agree("broadcast", tensor.dtype, tensor.numel())
        self._claim("broadcast", [tensor])
        dist.broadcast(tensor, src=self.global_rank(src), group=self.group)

    @_names_failures("all-gather")
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
