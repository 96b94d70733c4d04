"""shardopt.dist.launch_env: each launcher's variables, and the error cases.

Pure: every test passes its own environment mapping; nothing is initialised.
"""

from __future__ import annotations

import pytest

from shardopt.dist import DEFAULT_PORT, LaunchEnv, first_slurm_host, launch_env

# ----------------------------------------------------------------- launchers


def test_started_alone_is_none():
    assert launch_env({}) is None
    assert launch_env({"PATH": "/usr/bin", "MASTER_ADDR": "127.0.0.1", "SLURM_JOB_ID": "7"}) is None


def test_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501"}
    assert launch_env(env) == LaunchEnv("torchrun", 3, 4, 1, "10.0.0.1", 29501)


def test_torchrun_single_process_needs_no_master():
    assert launch_env({"RANK": "0", "WORLD_SIZE": "1"}) == LaunchEnv("torchrun", 0, 1, 0, None, None)


def test_torchrun_wins_over_slurm_and_mpi():
    # srun + torchrun: torchrun's workers inherit srun's SLURM_* variables.
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "29400",
           "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "node[1-2]",
           "PMI_RANK": "0", "PMI_SIZE": "1"}
    assert launch_env(env) == LaunchEnv("torchrun", 5, 8, 1, "node1", 29400)


def test_open_mpi():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    # No master: init_from_env agrees on one through mpi4py.
    assert launch_env(env) == LaunchEnv("openmpi", 1, 2, 1, None, None)


def test_open_mpi_with_exported_master():
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4",
           "MASTER_ADDR": "head", "MASTER_PORT": "1234"}
    assert launch_env(env) == LaunchEnv("openmpi", 0, 4, 0, "head", 1234)


def test_pmi_mpich_intel_mpi():
    env = {"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1",
           "PMI_FD": "9", "PMI_HOSTNAME": "vm"}
    assert launch_env(env) == LaunchEnv("pmi", 2, 3, 0, None, None)
    assert launch_env({"PMI_RANK": "1", "PMI_SIZE": "2"}) == LaunchEnv("pmi", 1, 2, 0, None, None)


def test_slurm_master_is_first_host_of_nodelist():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[003-005,9],cpu1"}
    assert launch_env(env) == LaunchEnv("slurm", 5, 8, 1, "gpu003", DEFAULT_PORT)


def test_slurm_old_nodelist_name_and_exported_master():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "n[7-8]"}
    assert launch_env(env) == LaunchEnv("slurm", 0, 2, 0, "n7", DEFAULT_PORT)
    env |= {"MASTER_ADDR": "login1", "MASTER_PORT": "12345"}
    assert launch_env(env) == LaunchEnv("slurm", 0, 2, 0, "login1", 12345)


def test_slurm_single_task_needs_no_nodelist():
    assert launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == LaunchEnv("slurm", 0, 1, 0, None, DEFAULT_PORT)


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("gpu[003-005,9],cpu1", "gpu003"),
        ("gpu[9,003-005]", "gpu9"),
        ("node17", "node17"),
        ("node17,node18", "node17"),
        ("a[7]", "a7"),
        ("rack1-node[01-04]", "rack1-node01"),
        ("rack[1-2]-node[01-04],login", "rack1-node01"),
        (" cn[0010-0020] ", "cn0010"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "gpu[003-005", "gpu]1", "[", ",node1", "gpu[]"])
def test_first_slurm_host_rejects(nodelist):
    with pytest.raises(ValueError, match=r"cannot parse SLURM_JOB_NODELIST"):
        first_slurm_host(nodelist)


# --------------------------------------------------------------- error cases

ERRORS = {
    "torchrun rank >= world": (
        {"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
        r"Invalid environment \(torchrun\): rank 4 is not in \[0, 4\)",
    ),
    "torchrun negative rank": (
        {"RANK": "-1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"},
        r"\(torchrun\): rank -1 is not in \[0, 2\)",
    ),
    "torchrun world size 0": ({"RANK": "0", "WORLD_SIZE": "0"}, r"\(torchrun\): world size 0 < 1"),
    "torchrun no master": (
        {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"},
        r"\(torchrun\): MASTER_ADDR is required for a multi-process job",
    ),
    "torchrun empty master": (
        {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": ""},
        r"\(torchrun\): MASTER_ADDR is required",
    ),
    "torchrun rank without world size": ({"RANK": "0"}, r"\(torchrun\): RANK is set but WORLD_SIZE is missing"),
    "torchrun world size without rank": ({"WORLD_SIZE": "2"}, r"\(torchrun\): WORLD_SIZE is set but RANK is missing"),
    "torchrun local rank above rank": (
        {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "MASTER_ADDR": "h"},
        r"\(torchrun\): local rank 2 for global rank 1",
    ),
    "torchrun non-integer rank": ({"RANK": "zero", "WORLD_SIZE": "2"}, r"RANK='zero' is not an integer"),
    "torchrun non-integer world size": ({"RANK": "0", "WORLD_SIZE": "2.0"}, r"WORLD_SIZE='2.0' is not an integer"),
    "torchrun non-integer local rank": (
        {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "x"},
        r"LOCAL_RANK='x' is not an integer",
    ),
    "non-integer port": (
        {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "http"},
        r"MASTER_PORT='http' is not an integer",
    ),
    "port out of range": (
        {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"},
        r"MASTER_PORT=70000 is not a TCP port \(1-65535\)",
    ),
    "open mpi rank >= world": (
        {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "2"},
        r"Invalid environment \(openmpi\): rank 2 is not in \[0, 2\)",
    ),
    "open mpi missing size": (
        {"OMPI_COMM_WORLD_RANK": "0"},
        r"\(openmpi\): OMPI_COMM_WORLD_RANK is set but OMPI_COMM_WORLD_SIZE is missing",
    ),
    "open mpi non-integer": (
        {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "two"},
        r"OMPI_COMM_WORLD_SIZE='two' is not an integer",
    ),
    "pmi rank >= world": (
        {"PMI_RANK": "5", "PMI_SIZE": "4"},
        r"Invalid environment \(pmi\): rank 5 is not in \[0, 4\)",
    ),
    "pmi missing size": ({"PMI_RANK": "0"}, r"\(pmi\): PMI_RANK is set but PMI_SIZE is missing"),
    "pmi local rank above rank": (
        {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"},
        r"\(pmi\): local rank 1 for global rank 0",
    ),
    "slurm rank >= world": (
        {"SLURM_PROCID": "8", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "n[1-2]"},
        r"Invalid environment \(slurm\): rank 8 is not in \[0, 8\)",
    ),
    "slurm no master": (
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"},
        r"\(slurm\): MASTER_ADDR is required for a multi-process job",
    ),
    "slurm non-integer": (
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "2(x2)", "SLURM_JOB_NODELIST": "n1"},
        r"SLURM_NTASKS='2\(x2\)' is not an integer",
    ),
    "slurm bad nodelist": (
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[1-2"},
        r"cannot parse SLURM_JOB_NODELIST='gpu\[1-2'",
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors(case):
    env, message = ERRORS[case]
    with pytest.raises(ValueError, match=message):
        launch_env(env)


def test_reads_os_environ_by_default(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert launch_env() is None
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "1")
    assert launch_env() == LaunchEnv("pmi", 0, 1, 0, None, None)


# ----------------------------------------------------------------- disagreeing processes (spawned)


def _init_with_world_size(rank: int, world_size: int, port: int, results) -> None:
    import os

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    from shardopt.dist import init_from_env

    try:
        init_from_env("gloo", timeout_s=20)
        results.put((rank, "started"))
    except RuntimeError as err:
        results.put((rank, str(err)))


def test_processes_that_disagree_on_the_world_size_are_told_so():
    # Rank 0 was launched with WORLD_SIZE=2, rank 1 with 3: both name the disagreement
    # within seconds instead of waiting for a store or gloo timeout.
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_init_with_world_size, args=(rank, size, port, results))
             for rank, size in enumerate((2, 3))]
    for proc in procs:
        proc.start()
    try:
        messages = dict(results.get(timeout=60) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    assert "rank 0 has 2, rank 1 has 3" in messages[0]
    assert "rank 1 has 3, rank 0 has 2" in messages[1]
    assert all("processes disagree on the world size" in m for m in messages.values())
