"""Start torch.distributed from whatever launched this process.

:func:`launch_env` reads the launcher's variables into a :class:`LaunchEnv`
(pure, unit-tested); :func:`init_from_env` turns it into a process group.

Recognised launchers, first match wins:

* torchrun / torch.distributed.run: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``.
* Open MPI: ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``,
  ``OMPI_COMM_WORLD_LOCAL_RANK``.
* MPICH / Intel MPI (PMI): ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``.
* Slurm (``srun``): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the
  master is the first host of ``SLURM_JOB_NODELIST`` (or ``SLURM_NODELIST``) unless
  ``MASTER_ADDR`` is set; the port is ``MASTER_PORT`` or 29500.

Under MPI, when no ``MASTER_ADDR``/``MASTER_PORT`` is given, rank 0 binds a
free port on ``127.0.0.1`` (single node) or on its host name, and mpi4py
broadcasts the address, so nothing has to be exported by hand.

Settings read by :func:`init_from_env` (arguments win over variables):

* ``SHARDOPT_BACKEND``: ``gloo`` or ``nccl`` (default: NCCL when a GPU is visible).
  NCCL without a visible GPU is refused before anything starts.
* ``SHARDOPT_TIMEOUT_S``: seconds a collective, and the rendezvous, may wait
  before failing (default 600), passed to ``init_process_group(timeout=...)``.
  Checkpointing and fault-tolerance code can rely on a hung peer surfacing as an
  error after this long.

Before the process group starts, every process publishes its world size in the
rendezvous store and compares it with rank 0's (rank 0 with every other rank's),
so processes launched with different ``WORLD_SIZE`` values fail with an error
naming both values instead of a generic store or gloo timeout. A process that
never arrives (a world size larger than the processes started) can only be
detected by the timeout; the error then says which rank rank 0 waited for.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_PORT = 29500
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Invalid environment: {name}={value!r} is not an integer") from None


def _required(env: Mapping[str, str], launcher: str, name: str, partner: str) -> int:
    if name not in env:
        raise ValueError(f"Invalid environment ({launcher}): {partner} is set but {name} is missing")
    return _int(env, name)


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[003-005,9],cpu1`` -> ``gpu003``.

    Handles several bracket groups in one name (``rack[1-2]-n[01-04]`` ->
    ``rack1-n01``) and keeps leading zeros.
    """
    text = nodelist.strip()
    host: list[str] = []
    i = 0
    while i < len(text) and text[i] != ",":
        if text[i] == "[":
            end = text.find("]", i)
            first = re.split(r"[,-]", text[i + 1 : end])[0] if end > i else ""
            if not first:
                break
            host.append(first)
            i = end + 1
        elif text[i] == "]":
            host = []
            break
        else:
            host.append(text[i])
            i += 1
    if not host or (i < len(text) and text[i] not in ","):
        raise ValueError(f"Invalid environment: cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    return "".join(host)


def launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The launcher's view of this process, or ``None`` when started alone.

    Raises ``ValueError`` naming the variables when they are incomplete,
    not integers, or disagree (a rank outside ``[0, world_size)``, a local
    rank above the global rank, no master address for a multi-process
    torchrun or Slurm job).
    """
    env = os.environ if env is None else env
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"Invalid environment: MASTER_PORT={port} is not a TCP port (1-65535)")
    addr = env.get("MASTER_ADDR") or None
    if "RANK" in env or "WORLD_SIZE" in env:
        rank_name, size_name = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
        _required(env, "torchrun", size_name, rank_name)
        found = LaunchEnv("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"),
                          _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0, addr, port)
    elif "OMPI_COMM_WORLD_RANK" in env:
        found = LaunchEnv("openmpi", _int(env, "OMPI_COMM_WORLD_RANK"),
                          _required(env, "openmpi", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                          _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0,
                          addr, port)
    elif "PMI_RANK" in env:
        found = LaunchEnv("pmi", _int(env, "PMI_RANK"), _required(env, "pmi", "PMI_SIZE", "PMI_RANK"),
                          _int(env, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in env else 0, addr, port)
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if addr is None and nodelist:
            addr = first_slurm_host(nodelist)
        found = LaunchEnv("slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"),
                          _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0, addr,
                          port if port is not None else DEFAULT_PORT)
    else:
        return None
    if found.world_size < 1:
        raise ValueError(f"Invalid environment ({found.launcher}): world size {found.world_size} < 1")
    if not 0 <= found.rank < found.world_size:
        raise ValueError(
            f"Invalid environment ({found.launcher}): rank {found.rank} is not in [0, {found.world_size})"
        )
    if found.local_rank < 0 or found.local_rank > found.rank:
        raise ValueError(
            f"Invalid environment ({found.launcher}): local rank {found.local_rank} for global rank {found.rank}"
        )
    if found.launcher in ("torchrun", "slurm") and found.world_size > 1 and found.master_addr is None:
        raise ValueError(
            f"Invalid environment ({found.launcher}): MASTER_ADDR is required for a multi-process job"
        )
    return found


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _mpi_rendezvous(found: LaunchEnv) -> tuple[str, int]:
    """Rank 0 picks an address and a free port; mpi4py broadcasts them."""
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise RuntimeError(
            "Started by mpirun without MASTER_ADDR/MASTER_PORT: install mpi4py "
            "(pip install 'shardopt[mpi]') or export both variables"
        ) from err
    comm = MPI.COMM_WORLD
    if comm.Get_size() != found.world_size:
        raise ValueError(f"Invalid environment: MPI world size {comm.Get_size()} != launcher's {found.world_size}")
    chosen = None
    if found.rank == 0:
        local_size = os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or os.environ.get("MPI_LOCALNRANKS")
        single_node = local_size is not None and int(local_size) == found.world_size
        # Loopback when every rank is on this host; otherwise an address peers can reach.
        host = found.master_addr or ("127.0.0.1" if single_node else socket.gethostname())
        chosen = (host, found.master_port or _free_port(host))
    return comm.bcast(chosen, root=0)


def default_backend() -> str:
    """NCCL when this process can see a GPU, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def collective_timeout_s(timeout_s: float | None = None, env: Mapping[str, str] | None = None) -> float:
    """``timeout_s``, else ``SHARDOPT_TIMEOUT_S``, else 600: seconds, a finite number > 0."""
    env = os.environ if env is None else env
    name, value = ("timeout_s", timeout_s) if timeout_s is not None else (
        "SHARDOPT_TIMEOUT_S", env.get("SHARDOPT_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"Invalid {name}: {value!r} (expected seconds, a finite number > 0)")
    return seconds


def check_backend(backend: str) -> None:
    """Refuse NCCL where this process sees no GPU (torch would fail later, less clearly)."""
    if backend == "nccl" and not (torch.cuda.is_available() and torch.cuda.device_count() > 0
                                  and dist.is_nccl_available()):
        raise RuntimeError("Invalid backend: nccl needs a CUDA GPU and this process sees none "
                           "(torch.cuda.is_available() is False); use gloo, e.g. SHARDOPT_BACKEND=gloo")


def _check_world_size(store: dist.Store, found: LaunchEnv, prefix: str) -> None:
    """Compare world sizes through the store: each rank with rank 0's, rank 0 with each rank's."""
    store.set(f"{prefix}/{found.rank}", str(found.world_size))
    others = range(1, found.world_size) if found.rank == 0 else (0,)
    for other in others:
        try:
            theirs = int(store.get(f"{prefix}/{other}"))
        except (RuntimeError, dist.DistError) as err:  # DistStoreError: the store's timeout
            raise RuntimeError(
                f"Launch failed: rank {found.rank} waited for rank {other} of WORLD_SIZE={found.world_size} "
                f"and it never arrived; were {found.world_size} processes started? ({err})") from None
        if found.rank:
            store.set(f"{prefix}/checked/{found.rank}", "1")
        if theirs != found.world_size:
            if found.rank == 0:
                # Serve the store a little longer, so the other ranks read rank 0's size and
                # name the disagreement too instead of losing the connection.
                with contextlib.suppress(RuntimeError, dist.DistError):
                    store.wait([f"{prefix}/checked/{r}" for r in range(1, min(theirs, found.world_size))],
                               datetime.timedelta(seconds=5))
            raise RuntimeError(
                f"Invalid environment: processes disagree on the world size: rank {found.rank} has "
                f"{found.world_size}, rank {other} has {theirs}; launch every process with the same "
                "WORLD_SIZE (or launcher size)")


def _rendezvous_store(found: LaunchEnv, addr: str, port: int, timeout: datetime.timedelta) -> dist.Store:
    """The TCP store ``init_process_group`` would create (env://), made here to check world sizes first."""
    # Under torchrun's c10d rendezvous the agent already serves the store at MASTER_ADDR/PORT.
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(addr, port, None, found.rank == 0 and not agent, timeout, wait_for_workers=False)
    # An elastic restart reuses the agent's store: each attempt gets its own key space, as
    # torch's env:// handler does (``/worker/attempt_N``). Without it, a restarted worker
    # reads gloo's peer addresses of the dead attempt and times out connecting to them.
    store = dist.PrefixStore(f"/worker/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    _check_world_size(store, found, "shardopt/world_size")
    return store


def init_from_env(backend: str | None = None, *, timeout_s: float | None = None) -> LaunchEnv | None:
    """Initialise the default process group from the launcher's environment.

    Returns the :class:`LaunchEnv`, or ``None`` (and initialises nothing) when
    the process was started alone. The backend is ``backend``, else the
    ``SHARDOPT_BACKEND`` variable, else :func:`default_backend`. Under NCCL each
    process takes GPU ``local_rank``; NCCL without a GPU raises ``RuntimeError``.
    ``timeout_s`` (else ``SHARDOPT_TIMEOUT_S``, else 600) bounds the rendezvous and
    every collective (``init_process_group(timeout=...)``). Processes that disagree
    on the world size raise ``RuntimeError`` naming both sizes (see the module doc).

    The group is destroyed at interpreter exit if the program has not done so:
    a process that exits with a live gloo group aborts in 1-5 of 10 runs with
    ``terminate called without an active exception`` (torch 2.13, plain
    ``torch.distributed``, no shardopt: ``benchmarks/stress_exits.py --variants
    gloo-no-destroy``).
    """
    import atexit

    found = launch_env()
    if found is None or dist.is_initialized():
        return found
    timeout = datetime.timedelta(seconds=collective_timeout_s(timeout_s))
    backend = backend or os.environ.get("SHARDOPT_BACKEND") or default_backend()
    check_backend(backend)
    addr, port = found.master_addr, found.master_port
    if found.launcher in ("openmpi", "pmi") and (addr is None or port is None):
        addr, port = _mpi_rendezvous(found)
    os.environ.update({"MASTER_ADDR": addr or "127.0.0.1", "MASTER_PORT": str(port or DEFAULT_PORT),
                       "RANK": str(found.rank), "WORLD_SIZE": str(found.world_size),
                       "LOCAL_RANK": str(found.local_rank)})
    if backend == "nccl":
        torch.cuda.set_device(found.local_rank % torch.cuda.device_count())
    store = _rendezvous_store(found, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), timeout)
    dist.init_process_group(backend, store=store, rank=found.rank, world_size=found.world_size, timeout=timeout)
    atexit.register(_destroy_if_initialized)
    return found


# shardopt's caches that hold a process group (through device meshes or plans): released
# before the group is destroyed at exit.
_GROUP_CACHES = (("shardopt.checkpoint.state_dict", "_MESHES"), ("shardopt.dtensor.exchange", "_PLANS"),
                 ("shardopt.dtensor.exchange", "_LAYOUTS"))


def _destroy_if_initialized() -> None:
    # A reference that outlives destroy_process_group keeps gloo's process group alive
    # into interpreter teardown, where its threads die unjoined ("terminate called
    # without an active exception", SIGABRT: torchrun counts a failure after the job's
    # work is done). Drop shardopt's own references first.
    for module_name, attribute in _GROUP_CACHES:
        module = sys.modules.get(module_name)
        if module is not None:
            getattr(module, attribute).clear()
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for_backend() -> torch.device:
    """The device collectives of the current backend need."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
