#!/usr/bin/env bash
# Data conversion as a Slurm array: task I converts slice I of N of the input into OUT/part-0000I/,
# then one dependent job merges the slices' manifests into OUT/manifest.json.
#
#   bash launch/convert_slurm.sh N --input rows.parquet --output /data/shards --image-size 256 ...
#
# Run with bash (not sbatch) to submit: it submits itself as an N-task array plus the merge job
# (afterok: the merge runs only when every slice succeeded). A failed or preempted task is
# re-run with the same command (or `scontrol requeue`): each slice resumes where it stopped, and
# the merge can be re-run by hand: python -m data_tools.merge_manifests OUT.
# Every task reads the whole input table and keeps its slice; nodes need the same paths.
#SBATCH --job-name=clipforge-convert
#SBATCH --array=0-15
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail

PY=${PY:-${SLURM_SUBMIT_DIR:-$(pwd)}/.venv/bin/python}
[[ -x "$PY" ]] || PY=python

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  # Submission: `bash launch/convert_slurm.sh N ARGS...`.
  if [[ $# -lt 3 || ! "$1" =~ ^[0-9]+$ ]]; then
    echo "usage: bash $0 N_SLICES --input ... --output OUT [convert options]" >&2
    exit 2
  fi
  n=$1; shift
  out=""
  args=("$@")
  for ((i = 0; i < ${#args[@]}; i++)); do
    [[ "${args[$i]}" == "--output" ]] && out=${args[$((i + 1))]}
  done
  [[ -n "$out" ]] || { echo "error: --output is required" >&2; exit 2; }
  # CONVERT_SBATCH_ARGS (e.g. "--cpus-per-task=4 --partition=cpu") override the #SBATCH lines.
  # shellcheck disable=SC2086
  array_id=$(sbatch --parsable ${CONVERT_SBATCH_ARGS:-} --array="0-$((n - 1))" "$0" convert "$@")
  sbatch --parsable --dependency="afterok:${array_id}" --array=0 --cpus-per-task=1 \
    --time=01:00:00 --job-name=clipforge-convert-merge "$0" merge "$out"
  echo "submitted array ${array_id} (${n} slices) and its merge into ${out}/manifest.json" >&2
  exit 0
fi

mode=$1; shift
if [[ "$mode" == "merge" ]]; then
  exec srun --ntasks=1 "$PY" -m data_tools.merge_manifests "$1"
fi

# SLURM_ARRAY_TASK_COUNT exists from Slurm 18.08; older ones give MIN/MAX only.
count=${SLURM_ARRAY_TASK_COUNT:-$((SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1))}
exec srun --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "$PY" -m data_tools.convert "$@" \
  --slice-index "${SLURM_ARRAY_TASK_ID}" --slice-count "${count}" \
  --processes "${SLURM_CPUS_PER_TASK:-1}" --no-progress
