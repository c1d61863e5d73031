# Shared setup for the tiny CPU scripts: synthetic data, a tiny Llama and a DRIP-4x-tiny tower in $WORK.
# Sourced, not run. Override WORK, TOWER, TOWER_CKPT (a clip-train checkpoint), NPROC, N, LM_STEPS.
set -euo pipefail
export DS_ACCELERATOR=cpu
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
DEEPSPEED=${DEEPSPEED:-$ROOT/.venv/bin/deepspeed}
WORK=${WORK:-$ROOT/runs/tiny-llava}
TOWER=${TOWER:-DRIP-4x-tiny}
NPROC=${NPROC:-2}
N=${N:-600}
mkdir -p "$WORK"
[ -f "$WORK/data/finetune.json" ] || "$PY" -m llava_drip.cli synth llava --out "$WORK/data" --n "$N" --seed 0 --quiet
[ -f "$WORK/llm/config.json" ] || "$PY" -m llava_drip.train.tiny --out "$WORK/llm" \
    --data "$WORK/data/pretrain.json" "$WORK/data/finetune.json" --lm-steps "${LM_STEPS:-150}"
if [ -z "${TOWER_CKPT:-}" ]; then
  TOWER_CKPT=$WORK/$TOWER-seed0.safetensors
  [ -f "$TOWER_CKPT" ] || "$PY" -c "from llava_drip.train.tiny_pipeline import save_random_tower as s; s('$TOWER', '$TOWER_CKPT')"
fi
COMMON=(--model_name_or_path "$WORK/llm" --image_folder "$WORK/data" --vision_tower "$TOWER"
        --vision_tower_pretrained "$TOWER_CKPT" --mm_projector_type mlp2x_gelu --use_cpu True
        --report_to none --dataloader_num_workers 0 --logging_steps 2 --model_max_length 384)
