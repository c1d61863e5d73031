#!/usr/bin/env bash
# Stage 2 on CPU with LoRA on the LLM (projector trained in full), 2 ranks under ZeRO-2.
source "$(dirname "$0")/common.sh"
"$DEEPSPEED" --num_gpus "$NPROC" "$ROOT/llava_drip/train/train.py" --deepspeed "$ROOT/scripts/zero2.json" "${COMMON[@]}" \
    --version v1 --data_path "$WORK/data/finetune.json" --pretrain_mm_mlp_adapter "$WORK/stage1/mm_projector.bin" \
    --image_aspect_ratio pad --group_by_modality_length True \
    --lora_enable True --lora_r 16 --lora_alpha 32 --mm_projector_lr 2e-3 \
    --output_dir "$WORK/stage2-lora" --num_train_epochs 2 --per_device_train_batch_size 8 \
    --learning_rate 2e-3 --save_strategy no "$@"
