#!/usr/bin/env bash
# LLaVA-1.5 stage 2 with LoRA on the LLM, LLaVA-1.5's flags (8 GPUs x 16) and a DRIP tower.
# Variables: see scripts/common.sh; PROJECTOR is stage 1's mm_projector.bin.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DATA_PATH=${DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data}
PROJECTOR=${PROJECTOR:-./checkpoints/$TAG-pretrain/mm_projector.bin}
OUT=${OUT:-./checkpoints/$TAG-lora}

"$DEEPSPEED" "${LAUNCH[@]}" "$ROOT/llava_drip/train/train_mem.py" \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    --deepspeed "$ROOT/scripts/zero3.json" \
    --model_name_or_path "$LLM" \
    --version v1 \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    "${TOWER_ARGS[@]}" \
    --pretrain_mm_mlp_adapter "$PROJECTOR" \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer "$SELECT_LAYER" \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir "$OUT" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 50000 \
    --save_total_limit 1 \
    --learning_rate 2e-4 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to "$REPORT_TO" \
    "${EXTRA[@]}" "$@"
