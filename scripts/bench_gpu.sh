#!/usr/bin/env bash
# The GPU benchmark, one prepared run for one GPU (about 5-8 minutes): writes JSON under docs/results/.
#   1. encoder: ViT-B-32/16 vs DRIP-2x/4x/10x-32/16, bf16, batch 1/64/256, padded vs packed layouts
#   2. one contrastive train step (ClipLoss + boundary prior, AdamW, bf16 autocast): ViT-B-32 vs DRIP-4x-32,
#      time and torch.cuda.max_memory_allocated (memory from a fresh process per model)
#   3. LLM prefill, a 7B-shaped random-init Llama: 576 visual tokens (LLaVA-1.5) vs DRIP's 2x/4x/10x of them
# Every stage times its configurations interleaved over several rounds and records median and spread.
#
#   scripts/bench_gpu.sh [--out DIR]     on the GPU (DIR: docs/results)
#   scripts/bench_gpu.sh --dry-run       the same three commands on CPU at tiny shapes (make test runs it);
#                                        DIR defaults to a temporary folder, printed at the end
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "bench_gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
cd "$ROOT"
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-$(mktemp -d)}
  DEV=cpu; DTYPE=fp32; TAG=dryrun
  ENCODERS="DRIP-4x-tiny"; ENC_BATCH=1,4; ENC_ITERS=1
  TRAIN=ViT-tiny,DRIP-4x-tiny; TRAIN_BATCH=8
  LLM=tiny; TOKENS=64,16; PREFILL_BATCH=2
else
  OUT=${OUT:-docs/results}
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench_gpu.sh: no CUDA device (use --dry-run on CPU)')"
  DEV=cuda; DTYPE=bf16; TAG=gpu
  ENCODERS="DRIP-2x-32 DRIP-4x-32 DRIP-10x-32 DRIP-2x-16 DRIP-4x-16 DRIP-10x-16"; ENC_BATCH=1,64,256; ENC_ITERS=5
  TRAIN=ViT-B-32,DRIP-4x-32; TRAIN_BATCH=256
  LLM=7b; TOKENS=576,288,144,58; PREFILL_BATCH=8
fi
mkdir -p "$OUT"
start=$(date +%s)
echo "== encoder ($DEV, $DTYPE) =="
# shellcheck disable=SC2086  # the model list is meant to split
"$PY" -m llava_drip.cli bench encoder --model $ENCODERS --batch-sizes "$ENC_BATCH" --iters "$ENC_ITERS" \
  --device "$DEV" --dtype "$DTYPE" --markdown --out "$OUT/bench_encoder_$TAG.json"
echo "== contrastive train step =="
"$PY" -m llava_drip.cli bench train-step --models "$TRAIN" --batch-size "$TRAIN_BATCH" --device "$DEV" \
  --dtype "$DTYPE" --out "$OUT/bench_train_step_$TAG.json"
echo "== LLM prefill ($LLM) =="
"$PY" -m llava_drip.cli bench prefill --llm "$LLM" --visual-tokens "$TOKENS" --batch-size "$PREFILL_BATCH" \
  --device "$DEV" --out "$OUT/bench_prefill_$TAG.json"
echo "bench_gpu.sh: wrote $OUT/bench_{encoder,train_step,prefill}_$TAG.json in $(( $(date +%s) - start )) s"
