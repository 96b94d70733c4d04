"""The example under real launchers gives the parameters of one process.

(a) two torchrun "nodes" on this machine (``--nnodes 2``, c10d rendezvous on
127.0.0.1, two processes each) through launch/torchrun_multi_node.sh;
(b) ``mpirun -n 2`` through launch/mpirun.sh, bootstrapped by mpi4py (no
MASTER_ADDR exported); (c) launch/slurm_per_gpu.sbatch under a stand-in
``srun`` that starts two tasks with Slurm's variables. Each trains the example
for a few ZeroOptimizer steps and must end within 1e-5 of a single-process run
on the whole batch.

Every launch has a hard deadline; on failure or timeout the launcher and all
its descendants (torchrun starts workers in their own sessions) are killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import train_gpt  # noqa: E402

CHECK = ROOT / "tests" / "launch_check.py"
# A few AdamW steps of the example on small batches. eps = 1e-6 instead of 1e-8:
# where a gradient element is ~1e-9, Adam's update lr * g / (|g| + eps) turns
# fp32 rounding differences (summation order differs across ranks and thread
# counts) into parameter differences up to lr / eps * 1e-10 = 3e-5 at eps = 1e-8
# (5.6e-6 measured, in one embedding element, even between 1 and 2 threads of
# one process: 1.9e-6); at 1e-6 the largest measured was 9e-7.
CONFIG = {"optimizer": "adamw", "steps": 4, "batch_size": 8, "seq_len": 32, "eval_every": 1000, "plot": "",
          "hyperparameters": {"eps": 1e-6}}
TIMEOUT_S = 150
TOLERANCE = 1e-5
LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "SLURM_", "MPI_LOCAL", "HYDRA_", "TORCHELASTIC_")
LAUNCHER_NAMES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                  "MASTER_PORT", "SHARDOPT_BACKEND"}
INSTALL_MPI = "install the project's mpi extra: pip install -e '.[dev,mpi]' (mpi4py + MPICH wheels)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables, the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_NAMES and not k.startswith(LAUNCHER_PREFIXES)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    for pid in [*_descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def run_all(commands: list[list[str]], env: dict[str, str], logs: Path, timeout: float = TIMEOUT_S) -> None:
    """Run the commands concurrently; fail with their output on an error or at the deadline."""
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    try:
        for i, cmd in enumerate(commands):
            out = open(logs / f"launcher{i}.log", "w+b")  # noqa: SIM115 - closed below
            files.append(out)
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        running = [p for p in procs if p.poll() is None]
        for proc in running:
            _kill_tree(proc)
        for out in files:
            out.close()
    if running or any(p.returncode != 0 for p in procs):
        why = f"timed out after {timeout} s" if running else f"exit codes {[p.returncode for p in procs]}"
        tails = "\n".join(f"--- {' '.join(cmd)}\n{(logs / f'launcher{i}.log').read_text()[-3000:]}"
                          for i, cmd in enumerate(commands))
        pytest.fail(f"launch failed ({why}):\n{tails}")


def read_ranks(out: Path, world_size: int) -> list[dict]:
    records = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    assert sorted(r["rank"] for r in records) == list(range(world_size))
    return sorted(records, key=lambda r: r["rank"])


def assert_same_params(path: Path, reference: Path) -> float:
    got, want = torch.load(path), torch.load(reference)
    assert got.keys() == want.keys()
    diffs = {name: (got[name] - want[name]).abs().max().item() for name in want}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOLERANCE, f"{worst} differs by {diffs[worst]:.3g} from the single-process run"
    return diffs[worst]


@pytest.fixture(scope="module")
def args(tmp_path_factory) -> list[str]:
    path = tmp_path_factory.mktemp("config") / "launch.json"
    path.write_text(json.dumps(CONFIG))
    return ["--config", str(path)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, args) -> Path:
    """The same steps in this process, one rank, the whole batch."""
    path = tmp_path_factory.mktemp("reference") / "params.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with mock.patch.dict(os.environ, clean_env(), clear=True):
            train_gpt.main([*args, "--save-params", str(path)])
    finally:
        torch.set_num_threads(threads)
    return path


def test_two_torchrun_nodes_c10d_match_one_process(tmp_path, args, reference):
    port = free_port()
    env = clean_env(NNODES="2", NPROC_PER_NODE="2", RDZV_ENDPOINT=f"127.0.0.1:{port}",
                    RDZV_ID=uuid.uuid4().hex, LOCAL_ADDR="127.0.0.1", SCRIPT=str(CHECK),
                    LAUNCH_CHECK_DIR=str(tmp_path))
    node = ["bash", str(ROOT / "launch" / "torchrun_multi_node.sh"), *args,
            "--stage", "2", "--save-params", str(tmp_path / "params.pt")]
    run_all([node, node], env, tmp_path / "logs")
    ranks = read_ranks(tmp_path, 4)
    assert {r["launcher"] for r in ranks} == {"torchrun"}
    assert {r["world_size"] for r in ranks} == {4}
    assert sorted(r["local_rank"] for r in ranks) == [0, 0, 1, 1]  # two processes on each node
    assert {(r["master_addr"], r["master_port"]) for r in ranks} == {("127.0.0.1", ranks[0]["master_port"])}
    assert_same_params(tmp_path / "params.pt", reference)


def test_mpirun_bootstraps_through_mpi4py_and_matches_one_process(tmp_path, args, reference):
    venv_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    if shutil.which("mpirun", path=venv_path) is None:
        pytest.fail(f"mpirun is not installed: {INSTALL_MPI}")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.fail(f"mpi4py is not installed: {INSTALL_MPI}")
    env = clean_env(NP="2", PYTHON=sys.executable, SCRIPT=str(CHECK), LAUNCH_CHECK_DIR=str(tmp_path))
    cmd = ["bash", str(ROOT / "launch" / "mpirun.sh"), *args, "--stage", "1",
           "--save-params", str(tmp_path / "params.pt")]
    run_all([cmd], env, tmp_path / "logs")
    ranks = read_ranks(tmp_path, 2)
    assert {r["launcher"] for r in ranks} <= {"pmi", "openmpi"}
    assert {r["master_addr_given"] for r in ranks} == {None}  # nothing exported: mpi4py agreed on it
    assert {r["world_size"] for r in ranks} == {2}
    assert {(r["master_addr"], r["master_port"]) for r in ranks} == {("127.0.0.1", ranks[0]["master_port"])}
    assert_same_params(tmp_path / "params.pt", reference)


FAKE_SRUN = """#!/bin/bash
# Stand-in for srun on one machine: FAKE_TASKS copies of the command, each with
# the variables srun gives a task (options before the command are ignored).
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < FAKE_TASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=$FAKE_TASKS "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


def test_slurm_one_task_per_gpu_script_matches_one_process(tmp_path, args, reference):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = clean_env(FAKE_TASKS="2", SLURM_JOB_ID="1", SLURM_JOB_NODELIST="127.0.0.1", SLURM_SUBMIT_DIR=str(ROOT),
                    MASTER_PORT=str(free_port()))
    env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
    cmd = ["bash", str(ROOT / "launch" / "slurm_per_gpu.sbatch"), *args, "--save-params", str(tmp_path / "params.pt")]
    run_all([cmd], env, tmp_path / "logs")
    assert "2 rank(s) via slurm" in (tmp_path / "logs" / "launcher0.log").read_text()
    assert_same_params(tmp_path / "params.pt", reference)
