#!/usr/bin/env bash
# One node, N processes (GPUs, or CPU processes with gloo):
#   NPROC=2 bash launch/local.sh experiment=smoke_cpu run_dir=runs/smoke
# Arguments are hydra overrides for clipforge.train; the config is validated first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${CLIPFORGE_PYTHON:-.venv/bin/python}
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c 'import torch; print(torch.cuda.device_count() or 1)')
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$PY" -m clipforge.check --world-size "$NPROC" "$@"
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m clipforge.train "$@"
