#!/usr/bin/env bash
# Stage 2 on CPU: full instruction tuning, `vicuna_v1` template, 2 ranks under ZeRO-3.
source "$(dirname "$0")/common.sh"
"$DEEPSPEED" --num_gpus "$NPROC" "$ROOT/llava_drip/train/train.py" --deepspeed "$ROOT/scripts/zero3.json" "${COMMON[@]}" \
    --version v1 --data_path "$WORK/data/finetune.json" --pretrain_mm_mlp_adapter "$WORK/stage1/mm_projector.bin" \
    --image_aspect_ratio pad --group_by_modality_length True \
    --output_dir "$WORK/stage2" --num_train_epochs 2 --per_device_train_batch_size 8 \
    --learning_rate 1e-3 --save_strategy epoch "$@"
