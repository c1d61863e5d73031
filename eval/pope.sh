#!/usr/bin/env bash
# POPE (COCO val2014, LLaVA-1.5's llava_pope_test.jsonl): answer with the model, then score.
# Usage: bash eval/pope.sh MODEL_PATH [NAME]
# One answering process per GPU in CUDA_VISIBLE_DEVICES, each on its own chunk of the questions.
# Environment: POPE_DIR (default playground/data/eval/pope, holding llava_pope_test.jsonl, coco/
# with POPE's coco_pope_{adversarial,popular,random}.json, and val2014/), POPE_IMAGE_FOLDER
# (default $POPE_DIR/val2014), CONV_MODE (vicuna_v1), PYTHON (python), POPE_ANSWER_ARGS (default
# --max_new_tokens 128, LLaVA's model_vqa_loader default), REUSE_ANSWERS=1 to rescore an
# existing answers file without running the model.
set -euo pipefail

MODEL_PATH=${1:?usage: bash eval/pope.sh MODEL_PATH [NAME]}
NAME=${2:-$(basename "$MODEL_PATH")}
POPE_DIR=${POPE_DIR:-playground/data/eval/pope}
POPE_IMAGE_FOLDER=${POPE_IMAGE_FOLDER:-$POPE_DIR/val2014}
CONV_MODE=${CONV_MODE:-vicuna_v1}
PYTHON=${PYTHON:-python}
POPE_ANSWER_ARGS=${POPE_ANSWER_ARGS---max_new_tokens 128}
QUESTIONS=$POPE_DIR/llava_pope_test.jsonl
ANSWERS=$POPE_DIR/answers/$NAME.jsonl

if [ "${REUSE_ANSWERS:-0}" = 1 ] && [ -s "$ANSWERS" ]; then
    echo "reusing $ANSWERS"
else
    IFS=',' read -ra GPUS <<< "${CUDA_VISIBLE_DEVICES:-0}"
    CHUNKS=${#GPUS[@]}
    mkdir -p "$POPE_DIR/answers/$NAME"
    PIDS=()
    for IDX in $(seq 0 $((CHUNKS - 1))); do
        # shellcheck disable=SC2086  # POPE_ANSWER_ARGS is a list of flags
        CUDA_VISIBLE_DEVICES=${GPUS[$IDX]} "$PYTHON" -m llava_drip.eval.model_vqa \
            --model-path "$MODEL_PATH" \
            --question-file "$QUESTIONS" \
            --image-folder "$POPE_IMAGE_FOLDER" \
            --answers-file "$POPE_DIR/answers/$NAME/${CHUNKS}_${IDX}.jsonl" \
            --num-chunks "$CHUNKS" --chunk-idx "$IDX" \
            --temperature 0 --conv-mode "$CONV_MODE" $POPE_ANSWER_ARGS &
        PIDS+=($!)
    done
    # a bare `wait` returns 0 whatever the chunks did; waiting on each pid lets set -e stop on a failure
    for PID in "${PIDS[@]}"; do wait "$PID"; done
    : > "$ANSWERS"
    for IDX in $(seq 0 $((CHUNKS - 1))); do
        cat "$POPE_DIR/answers/$NAME/${CHUNKS}_${IDX}.jsonl" >> "$ANSWERS"
    done
fi

"$PYTHON" -m llava_drip.eval.eval_pope \
    --annotation-dir "$POPE_DIR/coco" \
    --question-file "$QUESTIONS" \
    --result-file "$ANSWERS" \
    --output-result "$POPE_DIR/answers/${NAME}_result.json"
