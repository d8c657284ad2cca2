#!/usr/bin/env bash
# The demo, offline, on real data a package ships: MNIST digits -> raw dump (PNG files + CSV of
# templated captions) -> WebDataset shards -> sentencepiece tokenizer -> a tiny CLIP trained by
# 2 processes through DeepSpeed -> zero-shot accuracy on 500 held-out digits.
#   bash launch/demo.sh [OUT_DIR]        (make demo)
set -euo pipefail
OUT=${1:-.demo}
PY=${PY:-.venv/bin/python}
NPROC=${NPROC:-2}
export HF_HUB_OFFLINE=1 WANDB_SILENT=true PYTHONUNBUFFERED=1
start=$(date +%s)
rm -rf "$OUT" && mkdir -p "$OUT"

$PY -m data_tools.demo_mnist "$OUT/dump"
$PY -m data_tools.convert --input "$OUT/dump/train.csv" --url-col path --caption-col caption \
  --output "$OUT/shards/train" --image-size 32 --resize-mode center_crop \
  --samples-per-shard 500 --processes 2
$PY -m data_tools.convert --input "$OUT/dump/test.csv" --url-col path --caption-col caption \
  --cls-col label --output "$OUT/shards/test" --image-size 32 --resize-mode center_crop \
  --samples-per-shard 500 --processes 1
cp "$OUT/dump/classnames.txt" "$OUT/dump/zeroshot_classification_templates.txt" "$OUT/shards/test/"
$PY -m data_tools.tokenizer --input "$OUT/shards/train" --vocab-size 256

# OMP threads: the two ranks share two cores; more threads per rank only contend.
OMP_NUM_THREADS=1 $PY -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  -m clipforge.train experiment=mnist_demo run_dir="$OUT/run" \
  data.train="$OUT/shards/train" eval.zeroshot="$OUT/shards/test" "${@:2}" 2>&1 | tee "$OUT/train.log"

acc=$(grep -o 'zero-shot step [0-9]*: top1 [0-9.]*' "$OUT/train.log" | tail -1 | awk '{print $NF}')
echo "demo: zero-shot top-1 accuracy on 500 held-out digits = ${acc} ($(( $(date +%s) - start )) s total)"
