#!/usr/bin/env bash
# Contrastive mini reproduction on CPU: ViT-tiny vs DRIP-{2,4,10}x-tiny on synthetic data, same budget.
# Writes runs/clip_synthetic/<model>/{checkpoints/,model.safetensors,efficiency.json} and
# docs/results/clip_synthetic.md. Extra flags go to llava_drip.clip.repro (e.g. --epochs 2, --force).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
cd "$ROOT"
exec "$PY" -m llava_drip.clip.repro "$@"
