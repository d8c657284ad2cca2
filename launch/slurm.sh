#!/usr/bin/env bash
# Multi-node training under Slurm: one srun task per node, each starting torchrun for that
# node's GPUs (or CPU processes), rendezvous on the allocation's first node.
#
#   sbatch -N 2 launch/slurm.sh experiment=smoke_cpu run_dir=/shared/runs/smoke
#   sbatch -N 64 --gpus-per-node 8 launch/slurm.sh model=vit_b32 data.train=s3://... run_dir=...
#   sbatch -N 32-64 --gpus-per-node 8 launch/slurm.sh ...   # requeued onto whatever is free
#
# Every argument is a hydra override for clipforge.train. The configuration is validated before
# any training process starts. Preemption: Slurm sends USR1 to this script 120 s before the end
# (or when `scancel --signal=USR1 --batch JOB` asks); the trainers checkpoint at the next step
# boundary and exit, then this script requeues the job, which resumes with resume=latest.
# A requeue may land on another node count (-N MIN-MAX): the run keeps its global batch,
# re-partitions its ZeRO state and, in data.mode=epoch, its exact place in the epoch
# (docs/resume.md); a global batch that does not split over the new world stops at the check.
#SBATCH --job-name=clipforge
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -euo pipefail

# ---- site knobs, in one place ------------------------------------------------------------------
PY=${CLIPFORGE_PYTHON:-${SLURM_SUBMIT_DIR:-.}/.venv/bin/python}
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# export NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5 NCCL_DEBUG=WARN   # site network, if needed
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# ------------------------------------------------------------------------------------------------

cd "${SLURM_SUBMIT_DIR:-.}"
overrides=("$@")
run_dir=$(printf '%s\n' "$@" | sed -n 's/^run_dir=//p' | tail -n 1)
[ -n "$run_dir" ] || { echo "error: pass run_dir=DIR (on a filesystem every node sees)" >&2; exit 2; }
# A requeued job (or a re-submitted one) continues the newest checkpoint of its run_dir.
if ! printf '%s\n' "$@" | grep -q '^resume='; then overrides+=("resume=latest"); fi

if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" -gt 0 ]; then
  procs_per_node=$SLURM_GPUS_ON_NODE
else
  procs_per_node=${PROCS_PER_NODE:-1}
fi
nodes=${SLURM_NNODES:-1}
world=$((nodes * procs_per_node))

# Fail before any process starts: every config problem in one message.
"$PY" -m clipforge.check --world-size "$world" "${overrides[@]}"

master=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
echo "clipforge: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: ${nodes} nodes x ${procs_per_node} procs, rendezvous ${master}:${MASTER_PORT}"

preempted=0
mkdir -p "$run_dir"
rm -f "$run_dir/preempt.flag"
on_usr1() {
  preempted=1
  echo "clipforge: USR1 received, asking the trainers to checkpoint and stop"
  touch "$run_dir/preempt.flag"
}
trap on_usr1 USR1

# One task per node; each starts torchrun, which rendezvous through a c10d store on the first node.
# The task count is given, not inherited: a job requeued onto fewer nodes keeps the task count
# (SLURM_NTASKS) of its first allocation.
srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  echo "clipforge: node ${SLURMD_NODENAME:-$(hostname)} node_rank ${SLURM_NODEID}"
  exec "$0" -m torch.distributed.run --nnodes "$1" --nproc_per_node "$2" \
    --rdzv-backend c10d --rdzv-endpoint "$3:$4" --rdzv-id "${SLURM_JOB_ID:-0}" \
    -m clipforge.train "${@:5}"
' "$PY" "$nodes" "$procs_per_node" "$master" "$MASTER_PORT" "${overrides[@]}" &
step=$!
# `wait` returns when a trapped signal arrives; keep waiting for the trainers to finish.
status=0
while true; do
  wait "$step" && status=0 || status=$?
  kill -0 "$step" 2>/dev/null || break
done

if [ "$preempted" = 1 ] && [ "$status" = 0 ]; then
  echo "clipforge: checkpoint written, requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
