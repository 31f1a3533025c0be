#!/usr/bin/env bash
# DDP with torchrun on one machine: NPROC processes (GPUs, or CPU processes with gloo), LoRA on the quickstart task.
# torchrun starts the processes and sets RANK/LOCAL_RANK/WORLD_SIZE; Lightning then starts nothing itself.
# Checkpoints hold only the adapter (and its optimizer state) and are written once, by rank 0.
#
#   bash examples/torchrun_ddp.sh                 # 2 CPU processes
#   NPROC=8 ACCELERATOR=gpu bash examples/torchrun_ddp.sh
#   RESUME=runs/ddp/lightning_logs/version_0/checkpoints/last.ckpt bash examples/torchrun_ddp.sh
#
# Multi-node with torchrun: run the same command on every node with --nnodes=N --node_rank=<i>
# --master_addr=<node 0 address> --master_port=29500 and --trainer.num_nodes N (see configs/multinode.yaml).
set -euo pipefail
NPROC=${NPROC:-2}
ACCELERATOR=${ACCELERATOR:-cpu}
extra=()
if [[ -n "${RESUME:-}" ]]; then extra+=(--ckpt_path "$RESUME"); fi

torchrun --standalone --nnodes=1 --nproc_per_node="$NPROC" "$(command -v lightning-peft)" fit \
    --config configs/ddp.yaml \
    --trainer.accelerator "$ACCELERATOR" --trainer.devices "$NPROC" --trainer.strategy ddp \
    "${extra[@]}" "$@"
