#!/usr/bin/env bash
# torchrun on one or several nodes; every setting comes from the environment with a default.
#   bash launch/torchrun.sh --mode finetune                                    # this node, all its GPUs
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29400 bash launch/torchrun.sh ... # on node 0, then NODE_RANK=1
# Arguments go to train.py. The c10d rendezvous needs RDZV_ENDPOINT reachable from every node.
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [ -z "${NPROC_PER_NODE:-}" ]; then   # default: one process per GPU, or 2 on a machine without GPUs
    NPROC_PER_NODE=$(python -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
RDZV_ENDPOINT=${RDZV_ENDPOINT:-127.0.0.1:29400}
RDZV_ID=${RDZV_ID:-dtl-${USER:-job}}

set -x
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="$RDZV_ID" \
    train.py "$@"
