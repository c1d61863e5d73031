#!/usr/bin/env bash
# ScienceQA (test split, LLaVA's CQM-A question file): answer with the model, then score.
# Usage: bash eval/sqa.sh MODEL_PATH [NAME]
# One answering process per GPU in CUDA_VISIBLE_DEVICES, each on its own chunk of the questions.
# Environment: SQA_DIR (default playground/data/eval/scienceqa, holding llava_test_CQM-A.json or
# problems.json + pid_splits.json, and images/test/), CONV_MODE (vicuna_v1), PYTHON (python),
# SQA_ANSWER_ARGS (--single-pred-prompt: LLaVA's "Answer with the option's letter" suffix),
# REUSE_ANSWERS=1 to rescore an existing answers file without running the model.
set -euo pipefail

MODEL_PATH=${1:?usage: bash eval/sqa.sh MODEL_PATH [NAME]}
NAME=${2:-$(basename "$MODEL_PATH")}
SQA_DIR=${SQA_DIR:-playground/data/eval/scienceqa}
CONV_MODE=${CONV_MODE:-vicuna_v1}
PYTHON=${PYTHON:-python}
SQA_ANSWER_ARGS=${SQA_ANSWER_ARGS---single-pred-prompt}
QUESTIONS=$SQA_DIR/llava_test_CQM-A.json
ANSWERS=$SQA_DIR/answers/$NAME.jsonl

if [ ! -f "$QUESTIONS" ]; then
    # No LLaVA question file: build it from ScienceQA's own release.
    "$PYTHON" -m llava_drip.eval.convert_sqa --base-dir "$SQA_DIR" --split test --output "$QUESTIONS"
fi

if [ "${REUSE_ANSWERS:-0}" = 1 ] && [ -s "$ANSWERS" ]; then
    echo "reusing $ANSWERS"
else
    IFS=',' read -ra GPUS <<< "${CUDA_VISIBLE_DEVICES:-0}"
    CHUNKS=${#GPUS[@]}
    mkdir -p "$SQA_DIR/answers/$NAME"
    PIDS=()
    for IDX in $(seq 0 $((CHUNKS - 1))); do
        # shellcheck disable=SC2086  # SQA_ANSWER_ARGS is a list of flags
        CUDA_VISIBLE_DEVICES=${GPUS[$IDX]} "$PYTHON" -m llava_drip.eval.model_vqa_science \
            --model-path "$MODEL_PATH" \
            --question-file "$QUESTIONS" \
            --image-folder "$SQA_DIR/images/test" \
            --answers-file "$SQA_DIR/answers/$NAME/${CHUNKS}_${IDX}.jsonl" \
            --num-chunks "$CHUNKS" --chunk-idx "$IDX" \
            --temperature 0 --conv-mode "$CONV_MODE" $SQA_ANSWER_ARGS &
        PIDS+=($!)
    done
    # a bare `wait` returns 0 whatever the chunks did; waiting on each pid lets set -e stop on a failure
    for PID in "${PIDS[@]}"; do wait "$PID"; done
    : > "$ANSWERS"
    for IDX in $(seq 0 $((CHUNKS - 1))); do
        cat "$SQA_DIR/answers/$NAME/${CHUNKS}_${IDX}.jsonl" >> "$ANSWERS"
    done
fi

# The category table needs ScienceQA's problems.json; without it accuracy and IMG-accuracy only.
BASE_DIR_ARGS=()
[ -f "$SQA_DIR/problems.json" ] && BASE_DIR_ARGS=(--base-dir "$SQA_DIR")
"$PYTHON" -m llava_drip.eval.eval_science_qa \
    --question-file "$QUESTIONS" \
    --result-file "$ANSWERS" \
    "${BASE_DIR_ARGS[@]}" \
    --output-file "$SQA_DIR/answers/${NAME}_output.json" \
    --output-result "$SQA_DIR/answers/${NAME}_result.json"
