#!/usr/bin/env bash
# LLaVA-1.5 stage 2 (LoRA visual instruction tuning) with a DRIP tower, LLaVA-1.5's hyperparameters (8 GPUs x 16).
set -euo pipefail
DRIP_TOWER=${DRIP_TOWER:-DRIP-4x-16}
DRIP_CKPT=${DRIP_CKPT:?set DRIP_CKPT to the clip-train checkpoint of $DRIP_TOWER}
LLM=${LLM:-lmsys/vicuna-7b-v1.5}
PROJECTOR=${PROJECTOR:-./checkpoints/llava-v1.5-7b-${DRIP_TOWER}-pretrain/mm_projector.bin}
OUT=${OUT:-./checkpoints/llava-v1.5-7b-${DRIP_TOWER}-lora}

deepspeed llava_drip/train/train.py \
    --lora_enable True --lora_r 128 --lora_alpha 256 --mm_projector_lr 2e-5 \
    --deepspeed ./scripts/zero3.json \
    --model_name_or_path "$LLM" \
    --version v1 \
    --data_path ./playground/data/llava_v1_5_mix665k.json \
    --image_folder ./playground/data \
    --vision_tower "$DRIP_TOWER" \
    --vision_tower_pretrained "$DRIP_CKPT" \
    --pretrain_mm_mlp_adapter "$PROJECTOR" \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -1 \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir "$OUT" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 16 \
    --gradient_accumulation_steps 1 \
    --save_strategy steps \
    --save_steps 50000 \
    --save_total_limit 1 \
    --learning_rate 2e-4 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --tf32 True \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --report_to "${REPORT_TO:-tensorboard}"
