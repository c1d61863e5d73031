#!/usr/bin/env bash
# MME (LLaVA-1.5's llava_mme.jsonl): answer with the model, write MME's eval_tool files, score.
# Usage: bash eval/mme.sh MODEL_PATH [NAME]
# One answering process per GPU in CUDA_VISIBLE_DEVICES, each on its own chunk of the questions.
# Environment: MME_DIR (default playground/data/eval/MME, holding llava_mme.jsonl and MME's
# MME_Benchmark_release_version/: the images and the ground truth), MME_IMAGE_FOLDER (default
# $MME_DIR/MME_Benchmark_release_version), MME_GT_DIR (ground truth from eval_tool <subtask>.txt
# files instead of the release folder), CONV_MODE (vicuna_v1), PYTHON (python), MME_ANSWER_ARGS
# (default --max_new_tokens 128, LLaVA's model_vqa_loader default), REUSE_ANSWERS=1 to rescore an
# existing answers file without running the model.
# Outputs: $MME_DIR/answers/NAME.jsonl (question ids with a #1 / #2 suffix, see
# convert_answer_to_mme), $MME_DIR/eval_tool/answers/NAME/<subtask>.txt (LLaVA's places) and the
# figures in $MME_DIR/answers/NAME_result.json.
set -euo pipefail

MODEL_PATH=${1:?usage: bash eval/mme.sh MODEL_PATH [NAME]}
NAME=${2:-$(basename "$MODEL_PATH")}
MME_DIR=${MME_DIR:-playground/data/eval/MME}
MME_IMAGE_FOLDER=${MME_IMAGE_FOLDER:-$MME_DIR/MME_Benchmark_release_version}
CONV_MODE=${CONV_MODE:-vicuna_v1}
PYTHON=${PYTHON:-python}
MME_ANSWER_ARGS=${MME_ANSWER_ARGS---max_new_tokens 128}
QUESTIONS=$MME_DIR/llava_mme.jsonl
ANSWERS=$MME_DIR/answers/$NAME.jsonl
RESULTS_DIR=$MME_DIR/eval_tool/answers/$NAME

if [ "${REUSE_ANSWERS:-0}" = 1 ] && [ -s "$ANSWERS" ]; then
    echo "reusing $ANSWERS"
else
    IFS=',' read -ra GPUS <<< "${CUDA_VISIBLE_DEVICES:-0}"
    CHUNKS=${#GPUS[@]}
    mkdir -p "$MME_DIR/answers/$NAME"
    # LLaVA's file repeats each image's question_id (two questions an image); model_vqa keys answers by id
    UNIQUE_QUESTIONS=$MME_DIR/answers/$NAME/questions_unique_ids.jsonl
    "$PYTHON" -m llava_drip.eval.convert_answer_to_mme --question-file "$QUESTIONS" --unique-ids-to "$UNIQUE_QUESTIONS"
    PIDS=()
    for IDX in $(seq 0 $((CHUNKS - 1))); do
        # shellcheck disable=SC2086  # MME_ANSWER_ARGS is a list of flags
        CUDA_VISIBLE_DEVICES=${GPUS[$IDX]} "$PYTHON" -m llava_drip.eval.model_vqa \
            --model-path "$MODEL_PATH" \
            --question-file "$UNIQUE_QUESTIONS" \
            --image-folder "$MME_IMAGE_FOLDER" \
            --answers-file "$MME_DIR/answers/$NAME/${CHUNKS}_${IDX}.jsonl" \
            --num-chunks "$CHUNKS" --chunk-idx "$IDX" \
            --temperature 0 --conv-mode "$CONV_MODE" $MME_ANSWER_ARGS &
        PIDS+=($!)
    done
    # a bare `wait` returns 0 whatever the chunks did; waiting on each pid lets set -e stop on a failure
    for PID in "${PIDS[@]}"; do wait "$PID"; done
    : > "$ANSWERS"
    for IDX in $(seq 0 $((CHUNKS - 1))); do
        cat "$MME_DIR/answers/$NAME/${CHUNKS}_${IDX}.jsonl" >> "$ANSWERS"
    done
fi

if [ -n "${MME_GT_DIR:-}" ]; then
    GT_ARGS=(--gt-dir "$MME_GT_DIR")
else
    GT_ARGS=(--data-path "$MME_DIR/MME_Benchmark_release_version")
fi
# a rerun must not score subtask files left from an earlier answers file
rm -rf "$RESULTS_DIR"
"$PYTHON" -m llava_drip.eval.convert_answer_to_mme \
    --answers-file "$ANSWERS" \
    --question-file "$QUESTIONS" \
    "${GT_ARGS[@]}" \
    --output-dir "$RESULTS_DIR"
"$PYTHON" -m llava_drip.eval.eval_mme \
    --results_dir "$RESULTS_DIR" \
    --output-result "$MME_DIR/answers/${NAME}_result.json"
