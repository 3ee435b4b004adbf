#!/bin/bash
# mlplab DDP without SLURM: torchrun starts one process per GPU on each node and Lightning reads
# torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR) for the ranks.
#
# One node, every GPU:
#   scripts/torchrun.sh configs/mnist.yaml
# Two nodes of 4 GPUs (run on each node, NODE_RANK 0 and 1, MASTER_ADDR = node 0's address):
#   NNODES=2 NODE_RANK=0 GPUS_PER_NODE=4 MASTER_ADDR=10.0.0.1 scripts/torchrun.sh configs/mnist.yaml
set -euo pipefail

config=${1:?usage: scripts/torchrun.sh CONFIG.yaml [mlplab fit options]}
shift
nnodes=${NNODES:-1}
gpus=${GPUS_PER_NODE:-$(python -c "import torch; print(torch.cuda.device_count())")}

exec torchrun \
    --nnodes "$nnodes" \
    --node_rank "${NODE_RANK:-0}" \
    --nproc_per_node "$gpus" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" \
    --master_port "${MASTER_PORT:-29500}" \
    -m mlplab fit \
    --config "$config" \
    --config configs/trainer/ddp.yaml \
    --trainer.num_nodes "$nnodes" \
    --trainer.devices "$gpus" \
    "$@"
