#!/usr/bin/env bash
# Test a checkpoint on one or more machines with torchrun.
# Usage: tools/dist_test.sh CONFIG CHECKPOINT PROCS_PER_NODE [test.py args...]
# NNODES, NODE_RANK, MASTER_ADDR and PORT as in tools/dist_train.sh.
CONFIG=$1
CHECKPOINT=$2
NPROCS=$3
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
# the checkout on the path, as mmdet's scripts: custom_imports finds the
# package on every node even where it is not installed
PYTHONPATH="$(dirname "$0")/..${PYTHONPATH:+:$PYTHONPATH}" \
python -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" --nproc_per_node="$NPROCS" \
    --master_port="$PORT" "$(dirname "$0")/test.py" "$CONFIG" "$CHECKPOINT" \
    --launcher pytorch "${@:4}"
