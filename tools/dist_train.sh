#!/usr/bin/env bash
# Train on one or more machines with torchrun (CPU: gloo, GPU: nccl).
# Usage: tools/dist_train.sh CONFIG PROCS_PER_NODE [train.py args...]
# More than one machine: run it on each node with the same NNODES,
# MASTER_ADDR (node 0's address) and PORT, and that node's NODE_RANK, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 tools/dist_train.sh CFG 8  # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 tools/dist_train.sh CFG 8  # node 1
CONFIG=$1
NPROCS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
# the checkout on the path, as mmdet's scripts: custom_imports finds the
# package on every node even where it is not installed
PYTHONPATH="$(dirname "$0")/..${PYTHONPATH:+:$PYTHONPATH}" \
python -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" --nproc_per_node="$NPROCS" \
    --master_port="$PORT" "$(dirname "$0")/train.py" "$CONFIG" \
    --launcher pytorch "${@:3}"
