#!/bin/bash
# Plain SLURM template for clusters without submitit: one `torchrun` per node via srun, requeue on time-out.
#
#   sbatch launchers/sbatch_torchrun.sh configs/pretrain/vit_l_k400.yaml --data_path /data/k400
#   sbatch --nodes 16 launchers/sbatch_torchrun.sh configs/pretrain/vit_h_k400.yaml --data_path /data/k400
#   sbatch --nodes 8 launchers/sbatch_torchrun.sh configs/pretrain/vit_g_hybrid.yaml --hsdp_shard_size node
#
# HSDP (docs/scale.md): `--dist fsdp --hsdp_shard_size node` shards within each node and replicates across
# nodes; torchrun exports LOCAL_WORLD_SIZE=$GPUS_PER_NODE to every rank, which is what `node` reads.
#
# Edit the #SBATCH lines for your cluster (partition, account, GPUs per node, time).
# Time-outs: SLURM sends USR2 to this batch shell (B:) 120 s before the limit. The trap does not signal
# torchrun (its default USR2 action kills the launcher and every worker with it): it touches OUT/STOP,
# which rank 0 reads at the next step boundary; all ranks agree (util/preemption.py), save, and exit 0.
# The shell then requeues the job, which resumes from OUT/checkpoints/latest (--auto_resume) and appends
# to the same log.jsonl and TensorBoard run. Preemption (SIGTERM to the steps) is handled the same way
# in the workers; the requeue then comes from SLURM's own PreemptMode=REQUEUE.
#SBATCH --job-name=mae_st
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=80
#SBATCH --time=72:00:00
#SBATCH --signal=B:USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out

set -euo pipefail
CONFIG=${1:?usage: sbatch launchers/sbatch_torchrun.sh CONFIG.yaml [main_pretrain.py flags...]}
shift
SCRIPT=${SCRIPT:-main_pretrain.py}            # SCRIPT=main_finetune.py sbatch ... for fine-tuning
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAX_REQUEUES=${MAX_REQUEUES:-20}
OUT=${OUT:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}   # same job id after a requeue: same folder
mkdir -p "$OUT" runs/slurm

# Rendezvous on the first node of the allocation; c10d needs no extra service.
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}

STOP_ASKED=0
on_usr2() { STOP_ASKED=1; echo "USR2: asking the run to save and stop"; touch "$OUT/STOP"; }
trap on_usr2 USR2

# srun in the background + wait: bash runs a trap only between commands, and `wait` returns on a signal.
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" --rdzv_id "$SLURM_JOB_ID" \
    "$SCRIPT" --config "$CONFIG" --output_dir "$OUT" "$@" &
TRAIN_PID=$!
set +e
wait "$TRAIN_PID"; STATUS=$?
while kill -0 "$TRAIN_PID" 2>/dev/null; do wait "$TRAIN_PID"; STATUS=$?; done  # woken by the trap
set -e

RESTARTS=${SLURM_RESTART_COUNT:-0}
if [ "$STOP_ASKED" = 1 ] && [ "$STATUS" = 0 ] && [ "$RESTARTS" -lt "$MAX_REQUEUES" ]; then
    echo "stopped for the time limit with a checkpoint: requeueing (restart $((RESTARTS + 1)) of $MAX_REQUEUES)"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$STATUS"
