#!/usr/bin/env bash
# LLaVA-1.5 stage 1 (projector pretraining) with LLaVA-1.5's flags (8 GPUs x 32) and a DRIP tower.
# Variables: see scripts/common.sh (e.g. DRIP_CKPT=runs/clip/epoch_32.pt scripts/pretrain.sh).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DATA_PATH=${DATA_PATH:-./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data/LLaVA-Pretrain/images}
OUT=${OUT:-./checkpoints/$TAG-pretrain}

"$DEEPSPEED" "${LAUNCH[@]}" "$ROOT/llava_drip/train/train_mem.py" \
    --deepspeed "$ROOT/scripts/zero2.json" \
    --model_name_or_path "$LLM" \
    --version plain \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    "${TOWER_ARGS[@]}" \
    --mm_projector_type mlp2x_gelu \
    --tune_mm_mlp_adapter True \
    --mm_vision_select_layer "$SELECT_LAYER" \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --bf16 True \
    --output_dir "$OUT" \
    --num_train_epochs 1 \
    --per_device_train_batch_size 32 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 24000 \
    --save_total_limit 1 \
    --learning_rate 1e-3 \
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
