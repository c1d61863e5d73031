#!/usr/bin/env bash
# One LLaVA model for any visual-token budget? Stage 2 with random budgets per sample vs one fixed budget
# (and the tower's calibrated default), same base, each model scored at budgets 1.0/0.5/0.25/0.1 of the
# patches on held-out synthetic questions. Writes runs/llava_budgets/ and docs/results/llava_budgets.{md,json}.
# Extra flags go to llava_drip.train.budget_sweep (e.g. --seeds 0,1,2, --n-eval 400, --out DIR).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
cd "$ROOT"
exec "$PY" -m llava_drip.train.budget_sweep "$@"
