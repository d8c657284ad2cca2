#!/usr/bin/env bash
# The GPU check of clipforge, run once on a CUDA machine (a lent one is offline and bare):
#
#   bash tests/bench/gpu_check.sh          # from any directory; logs into $OUT (or .bench/gpu-check)
#
# 1. wheels carried in .whl/ (deepspeed, hydra-core, omegaconf, sentencepiece, open-clip-torch,
#    pytest, ... fetched elsewhere with `pip download --no-deps`) go into /tmp/site: no index,
#    no dependency resolution, torch and timm stay the machine's own;
# 2. a preflight names every module the tests and the bench import that is missing;
# 3. pytest -m gpu tests/test_gpu.py: one bf16 + compile + ZeRO-2 run of the tiny model through
#    torchrun, eval and export checked (about 2 minutes);
# 4. tests/bench/bench_gpu.py: ViT-B/32 samples/s and MFU, ours vs open_clip, and the loader's
#    data-wait fraction (about 5 minutes). Its shards come from .bench/gpu/shards_512 when
#    carried (build them where the data is: python tests/bench/bench_gpu.py --build-shards).
#
# Each step has its own time limit, so the whole stays under 10 minutes on an H200 even when one
# hangs. Exit status: non-zero if the preflight, the tests or the bench failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
LOGS=${OUT:-.bench/gpu-check}
mkdir -p "$LOGS"
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -3
  export PYTHONPATH=/tmp/site:$PWD/src:$PWD
else
  export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# Offline: nothing may reach for a hub, a wandb server or a compiled DeepSpeed op.
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
export BENCH_GPU_OUT=$LOGS

"$PY" - <<'EOF' 2>&1 | tee "$LOGS/preflight.log"
import importlib
import sys

import torch

cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"device: {torch.cuda.get_device_name(0) if cuda else 'none'}")
needed = ["timm", "deepspeed", "hydra", "omegaconf", "sentencepiece", "safetensors", "fsspec",
          "braceexpand", "pyarrow", "tqdm", "PIL", "numpy", "torchvision", "open_clip", "pytest",
          "clipforge.train", "data_tools.convert"]
missing = []
for name in needed:
    try:
        importlib.import_module(name)
    except Exception as e:  # any failure to import is worth one line here
        missing.append(f"{name}: {type(e).__name__}: {e}")
for line in missing:
    print("missing", line)
sys.exit(0 if cuda and not missing else 1)
EOF
preflight=${PIPESTATUS[0]}

timeout -k 10 210 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 \
  | tee "$LOGS/test_gpu.log"
tests=${PIPESTATUS[0]}

timeout -k 10 340 "$PY" tests/bench/bench_gpu.py 2>&1 | tee "$LOGS/bench_gpu.log"
bench=${PIPESTATUS[0]}
# The bench rewrote the "GPU" section of docs/benchmarks.md here; bring it back with the logs.
[ "$bench" -eq 0 ] && [ -z "${BENCH_GPU_DRY:-}" ] && cp docs/benchmarks.md "$LOGS/benchmarks.md"

echo "gpu_check: preflight rc=$preflight, tests rc=$tests, bench rc=$bench; logs in $LOGS" \
  | tee "$LOGS/summary.txt"
[ "$preflight" -eq 0 ] && [ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
