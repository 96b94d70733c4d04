#!/usr/bin/env bash
# Several machines: run this same command on every node (any order).
#
#   NNODES=2 RDZV_ENDPOINT=node0:29400 launch/torchrun_multi_node.sh [args for the example]
#
# c10d rendezvous (default): the agents meet at RDZV_ENDPOINT (host:port of any
# one node, reachable from all); node ranks follow join order, so NODE_RANK is
# optional. Static rendezvous: set MASTER_ADDR (node 0's address) and NODE_RANK
# (0..NNODES-1, distinct per node) instead of RDZV_ENDPOINT.
#
# Real cluster: RDZV_ENDPOINT=<first node>:29400, NPROC_PER_NODE=<GPUs per
# node>, a RDZV_ID unique per job. Two "nodes" on one machine (as the tests do):
# in two shells,
#   NNODES=2 NPROC_PER_NODE=1 RDZV_ENDPOINT=127.0.0.1:29400 LOCAL_ADDR=127.0.0.1 launch/torchrun_multi_node.sh
# (LOCAL_ADDR is the address this node advertises to the others; torchrun's
# default is the host's fully qualified name.)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
NNODES=${NNODES:-2}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
SCRIPT=${SCRIPT:-$here/../examples/train_gpt.py}

args=(--nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE")
if [[ -n "${MASTER_ADDR:-}" ]]; then
  args+=(--node-rank "${NODE_RANK:?static rendezvous needs NODE_RANK}"
         --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}")
else
  args+=(--rdzv-backend c10d --rdzv-endpoint "${RDZV_ENDPOINT:-127.0.0.1:29400}" --rdzv-id "${RDZV_ID:-shardopt}")
  [[ -n "${NODE_RANK:-}" ]] && args+=(--node-rank "$NODE_RANK")
fi
[[ -n "${LOCAL_ADDR:-}" ]] && args+=(--local-addr "$LOCAL_ADDR")

exec torchrun "${args[@]}" "$SCRIPT" "$@"
