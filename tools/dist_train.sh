#!/usr/bin/env bash
# Usage: tools/dist_train.sh CONFIG NUM_PROCS [train.py args...]
# Works on CPU (gloo backend) and GPU (nccl) through torchrun.
CONFIG=$1
NPROCS=$2
PORT=${PORT:-29500}
python -m torch.distributed.run --nnodes=1 --nproc_per_node="$NPROCS" \
    --master_port="$PORT" "$(dirname "$0")/train.py" "$CONFIG" \
    --launcher pytorch "${@:3}"
