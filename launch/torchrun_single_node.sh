#!/usr/bin/env bash
# One machine, NPROC_PER_NODE processes (torchrun's --standalone rendezvous).
#
#   launch/torchrun_single_node.sh [args for the example]
#   NPROC_PER_NODE=8 launch/torchrun_single_node.sh --config configs/llm_recipe.toml
#
# Real cluster node: set NPROC_PER_NODE to the number of GPUs; NCCL is chosen
# automatically when every rank sees a GPU (SHARDOPT_BACKEND=gloo forces CPU).
# SCRIPT runs your own training script instead of the example.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
SCRIPT=${SCRIPT:-$here/../examples/train_gpt.py}

exec torchrun --standalone --nproc-per-node "$NPROC_PER_NODE" "$SCRIPT" "$@"
