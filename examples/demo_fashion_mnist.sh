#!/usr/bin/env bash
# The README's main job (`make demo`): train MeCoQ on Fashion-MNIST with the ImageNet-pretrained
# EfficientNet-Lite0 on the CPU, evaluate it next to a plain PQ baseline on the pretrained features, build a
# code index and search it with a new image. About 3.5 minutes on 2 idle CPU cores (measured: 3 min 26 s).
#
#   bash examples/demo_fashion_mnist.sh [OUTPUT_DIR]      (default runs/fashion-mnist-demo)
#
# Data: the 10,000 Fashion-MNIST test images, split per class into 1,000 queries, 500 validation queries (model
# selection) and an 8,500-image database, from which 3,000 unlabelled images are drawn for training. Images
# are upsampled to 64 px. The backbone's last layer group trains with the head (mecoq train's default,
# --backbone-trainable 1); the frozen trunk before it runs once on 6 augmented views per training image
# (`training.cached_views`), so each epoch trains only the tail and the head on those cached outputs. Features
# are kept in OUTPUT_DIR/feature_cache; the PQ baseline runs on the pretrained (not fine-tuned) backbone.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/fashion-mnist-demo}
BIN=${BIN:-.venv/bin}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

rm -rf "$OUT"  # the demo's own folder: always a fresh run
echo "== 1/5 train (32 bits: 4 codebooks x 256 codewords)"
"$BIN/mecoq" train --preset paper --dataset fashion-mnist --split test \
    --num-query 1000 --num-validation 500 --train-size 3000 --seed 0 \
    --image-size 64 --bits 32 --epochs 10 --set training.cached_views=6 \
    --set training.feature_cache_dir="$OUT/feature_cache" --no-progress --output-dir "$OUT"

echo "== 2/5 evaluate: mAP@1000 of the queries against the database, next to PQ on the pretrained features"
"$BIN/mecoq" evaluate "$OUT" --map-k 1000 --baseline pq --feature-cache "$OUT/feature_cache" \
    --output "$OUT/metrics.json" --pr-curve "$OUT/pr_curve.png"

echo "== 3/5 index the 10,000 test images (4 bytes each)"
"$BIN/mecoq" index build "$OUT" --dataset fashion-mnist --split test --output "$OUT/index.safetensors"

echo "== 4/5 search with an image the index has never seen (the first training image)"
"$BIN/python" - "$OUT/query.png" <<'PY'
import sys
from mecoq_hf.data.sources import load_fashion_mnist
load_fashion_mnist("train", limit=1)[0]["image"].save(sys.argv[1])
PY
"$BIN/mecoq" search "$OUT/index.safetensors" --model "$OUT" --image "$OUT/query.png" --top-k 10 --grid "$OUT/search.png"

echo "== 5/5 model card (README.md of the model folder, with the mAP as model-index entries)"
"$BIN/mecoq" card "$OUT" --metrics "$OUT/metrics.json"
echo "Done: the model with its card, metrics.json, pr_curve.png, index.safetensors and search.png are in $OUT"
echo "Share it: $BIN/mecoq push $OUT your-name/mecoq-fashion-mnist-32bit --metrics $OUT/metrics.json"
