#!/usr/bin/env bash
# Both LLaVA stages on CPU, then a greedy answer from the result: the whole path in a few minutes.
set -euo pipefail
HERE=$(dirname "$0")
"$HERE/pretrain.sh"
"$HERE/finetune.sh"
source "$HERE/common.sh"
"$PY" -m llava_drip.cli chat --model-path "$WORK/stage2" --image-file "$WORK/data/images/000000.png" --temperature 0 <<< "What shape is shown?"
