#!/usr/bin/env bash
# LLaVA-1.5 stage 1 (projector pretraining) with a DRIP tower, LLaVA-1.5's hyperparameters (8 GPUs x 32).
# DRIP_TOWER: a registered DRIP name; DRIP_CKPT: its clip-train checkpoint (llava-drip clip-train).
set -euo pipefail
DRIP_TOWER=${DRIP_TOWER:-DRIP-4x-16}
DRIP_CKPT=${DRIP_CKPT:?set DRIP_CKPT to the clip-train checkpoint of $DRIP_TOWER}
LLM=${LLM:-lmsys/vicuna-7b-v1.5}
OUT=${OUT:-./checkpoints/llava-v1.5-7b-${DRIP_TOWER}-pretrain}

deepspeed llava_drip/train/train.py \
    --deepspeed ./scripts/zero2.json \
    --model_name_or_path "$LLM" \
    --version plain \
    --data_path ./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json \
    --image_folder ./playground/data/LLaVA-Pretrain/images \
    --vision_tower "$DRIP_TOWER" \
    --vision_tower_pretrained "$DRIP_CKPT" \
    --mm_projector_type mlp2x_gelu \
    --tune_mm_mlp_adapter True \
    --mm_vision_select_layer -1 \
    --bf16 True \
    --output_dir "$OUT" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 32 \
    --gradient_accumulation_steps 1 \
    --save_strategy steps \
    --save_steps 24000 \
    --save_total_limit 1 \
    --learning_rate 1e-3 \
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
