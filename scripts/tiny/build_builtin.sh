#!/usr/bin/env bash
# Rebuild the built-in model shipped in llava_drip/assets/tiny-llava, then measure it: DRIP-4x-tiny tower by
# clip-train (the shipped tower's recipe, trained under runs/clip_builtin_tower and reused from there), tiny Llama,
# LLaVA stages 1-2 on synthetic scenes, MANIFEST.json with checksums, docs/results/builtin_model.md.
# BUILD_ARGS go to `build` (e.g. --dest DIR --n 2000), CLIP_ARGS replace the tower recipe's flags (llava_drip.clip.repro;
# default "--epochs 8 --batch-size 128 --val-per-class 20", how the shipped tower was trained), EVAL_ARGS go to `eval` (e.g. --n 400 --doc FILE).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
cd "$ROOT"
read -r -a BUILD <<< "${BUILD_ARGS:-}"
read -r -a EVAL <<< "${EVAL_ARGS:-}"
"$PY" -m llava_drip.train.builtin_model build ${CLIP_ARGS:+--clip-args="$CLIP_ARGS"} "${BUILD[@]}"
"$PY" -m llava_drip.train.builtin_model eval "${EVAL[@]}"
