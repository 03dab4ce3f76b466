#!/bin/bash
# Multi-node DDP with torchrun (no SLURM): run this same script on every node.
# Run:  NODE_RANK=0 MASTER_ADDR=node0 bash experiments/slurm/torchrun.sh      (on node 0)
#       NODE_RANK=1 MASTER_ADDR=node0 bash experiments/slurm/torchrun.sh      (on node 1)
# torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; Lightning picks them up, so the trainer flags
# only have to agree with them (devices = GPUs per node, num_nodes = nodes).
set -euo pipefail
NNODES=${NNODES:-2}
GPUS=${GPUS:-4}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
torchrun --nnodes "$NNODES" --nproc_per_node "$GPUS" --node_rank "${NODE_RANK:?}" \
  --master_addr "${MASTER_ADDR:?}" --master_port "${MASTER_PORT:-29500}" \
  -m foundv2 fit --config experiments/paper-gpu/data.yaml --config experiments/paper-gpu/tokenizer.yaml \
  --trainer.accelerator gpu --trainer.devices "$GPUS" --trainer.num_nodes "$NNODES" \
  --trainer.strategy ddp --trainer.precision bf16-mixed
