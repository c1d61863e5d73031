#!/usr/bin/env bash
# Stage 1 on CPU: projector only, `plain` template, 2 ranks under ZeRO-2.
source "$(dirname "$0")/common.sh"
"$DEEPSPEED" --num_gpus "$NPROC" "$ROOT/llava_drip/train/train.py" --deepspeed "$ROOT/scripts/zero2.json" "${COMMON[@]}" \
    --version plain --data_path "$WORK/data/pretrain.json" --tune_mm_mlp_adapter True \
    --output_dir "$WORK/stage1" --num_train_epochs 1 --per_device_train_batch_size 8 \
    --learning_rate 2e-3 --save_strategy no "$@"
