#!/usr/bin/env bash
# Reranker training on a lent CUDA machine: generate the shapes train split, index it with the
# shipped demo encoder, and train the cross-attention reranker for many steps (the shipped
# reranker's recipe, docs/training.md "The shipped demo reranker": caption-only curriculum for the first 3/5 of
# the steps, then the residual), logging the validation curve. Writes under $OUT (or
# ./gpu-out). RECIPE overrides the architecture and loss flags. Run from the repository root:
#   bash benchmarks/gpu/gpu_train_reranker.sh
# $OUT/reranker/train_log.jsonl is the log research/results/train_logs/ keeps
# (reranker_train_h200_log.jsonl: an H200 run).
set -uo pipefail
. "$(dirname "$0")/_gpu_env.sh"
cr() { python3 -c "from crossrank.cli import main; main()" "$@"; }
STEPS=${STEPS:-12000}
cr dataset shapes --out /tmp/shapes-train --split train --n-images 20000 --n-queries 100 --seed 0 --json | tail -3
cr build /tmp/shapes-train/images --index /tmp/train.idx --device cuda --batch-size 512 --json | grep -E "indexed|seconds"
timeout ${TRAIN_S:-300} python3 -c "from crossrank.cli import main; main()" -v train /tmp/shapes-train/pairs.parquet --index /tmp/train.idx \
  --out "$OUT/reranker" --steps "$STEPS" --batch-size 32 --candidates 16 --loss listwise --lr 1e-3 --hard-fraction 0.5 \
  --curriculum 0.1 --mine-k 50 --eval-every 1000 --layers 2 --width 128 --heads 4 \
  ${RECIPE:---no-gated --init lecun --patch-positions 64 --first-stage-weight 35.9 --caption-negatives 6 --caption-only-steps $((STEPS * 3 / 5))} \
  --seed 0 --device cuda --json > "$OUT/train_report.json" 2> "$OUT/train.log"
echo "train rc=$?"
grep -E "step [0-9]+:" "$OUT/train.log" | tail -20
rm -f "$OUT/reranker/checkpoint.pt.tmp"
