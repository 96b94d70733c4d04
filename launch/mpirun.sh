#!/usr/bin/env bash
# MPI: mpirun starts NP copies; shardopt.dist.init_from_env() reads the MPI
# rank variables (MPICH/Intel MPI PMI_*, Open MPI OMPI_COMM_WORLD_*), and rank 0
# picks a free port and broadcasts it with mpi4py, so nothing else is exported.
#
#   NP=2 launch/mpirun.sh [args for the example]
#
# Needs mpi4py and an mpirun: pip install -e '.[mpi]' (mpi4py + MPICH wheels).
# Real cluster: use the site's MPI (the mpi4py built against it) and pass its
# host options in MPIRUN_ARGS, e.g. MPICH "-f hostfile -ppn 8", Open MPI
# "--hostfile hosts -npernode 8 -x PATH -x OMP_NUM_THREADS" (Open MPI forwards
# no variables to other nodes unless told, and as root needs --allow-run-as-root).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
NP=${NP:-2}
PYTHON=${PYTHON:-python}
SCRIPT=${SCRIPT:-$here/../examples/train_gpt.py}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # torchrun sets this; mpirun does not

# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of words
exec mpirun -n "$NP" ${MPIRUN_ARGS:-} "$PYTHON" "$SCRIPT" "$@"
