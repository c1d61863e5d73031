#!/usr/bin/env bash
# LLaVA-Bench-in-the-Wild: answer with the model, score offline (rule-based), judge if configured.
# Usage: bash eval/llavabench.sh MODEL_PATH [NAME]
# Environment: BENCH_DIR (default playground/data/eval/llava-bench-in-the-wild, holding
# questions.jsonl, context.jsonl, answers_gpt4.jsonl and images/), CONV_MODE (vicuna_v1),
# PYTHON (python), REUSE_ANSWERS=1 to rescore an existing answers file.
# LLM judge, run only when JUDGE_MODEL is set (e.g. gpt-4-0314, LLaVA's): JUDGE_BASE_URL (default
# $OPENAI_BASE_URL, else OpenAI), JUDGE_API_KEY_ENV (name of the variable holding the key, default
# OPENAI_API_KEY), JUDGE_RULE (default our llava_drip/eval/table/rule.json; LLaVA's rule.json
# reproduces its protocol), JUDGE_RUNS (default 3, as LLaVA-1.5 reports the mean of three runs;
# each run has its own reply cache).
set -euo pipefail

MODEL_PATH=${1:?usage: bash eval/llavabench.sh MODEL_PATH [NAME]}
NAME=${2:-$(basename "$MODEL_PATH")}
BENCH_DIR=${BENCH_DIR:-playground/data/eval/llava-bench-in-the-wild}
CONV_MODE=${CONV_MODE:-vicuna_v1}
PYTHON=${PYTHON:-python}
ANSWERS=$BENCH_DIR/answers/$NAME.jsonl
REVIEWS=$BENCH_DIR/reviews/$NAME
mkdir -p "$BENCH_DIR/answers" "$REVIEWS"

if [ "${REUSE_ANSWERS:-0}" = 1 ] && [ -s "$ANSWERS" ]; then
    echo "reusing $ANSWERS"
else
    "$PYTHON" -m llava_drip.eval.model_vqa \
        --model-path "$MODEL_PATH" \
        --question-file "$BENCH_DIR/questions.jsonl" \
        --image-folder "$BENCH_DIR/images" \
        --answers-file "$ANSWERS" \
        --temperature 0 --conv-mode "$CONV_MODE"
fi

# Offline scores: overlap with the GPT-4 reference answers (no API, deterministic).
"$PYTHON" -m llava_drip.eval.rule_scorer \
    --question "$BENCH_DIR/questions.jsonl" \
    --answer-list "${BENCH_ANSWERS_REF:-$BENCH_DIR/answers_gpt4.jsonl}" "$ANSWERS" \
    --output "$REVIEWS/rule.jsonl"

if [ -n "${JUDGE_MODEL:-}" ]; then
    JUDGE_ARGS=(--model "$JUDGE_MODEL" --api-key-env "${JUDGE_API_KEY_ENV:-OPENAI_API_KEY}")
    [ -n "${JUDGE_BASE_URL:-}" ] && JUDGE_ARGS+=(--base-url "$JUDGE_BASE_URL")
    [ -n "${JUDGE_RULE:-}" ] && JUDGE_ARGS+=(--rule "$JUDGE_RULE")
    RUN_FILES=()
    for RUN in $(seq 1 "${JUDGE_RUNS:-3}"); do
        "$PYTHON" -m llava_drip.eval.judge_llava_bench \
            --question "$BENCH_DIR/questions.jsonl" \
            --context "$BENCH_DIR/context.jsonl" \
            --answer-list "${BENCH_ANSWERS_REF:-$BENCH_DIR/answers_gpt4.jsonl}" "$ANSWERS" \
            --output "$REVIEWS/judge-eval$RUN.jsonl" \
            "${JUDGE_ARGS[@]}"
        RUN_FILES+=("$REVIEWS/judge-eval$RUN.jsonl")
    done
    echo "== LLM judge, relative to the GPT-4 answers"
    "$PYTHON" -m llava_drip.eval.summarize_gpt_review -f "${RUN_FILES[@]}"
else
    echo "JUDGE_MODEL not set: LLM judge skipped"
fi
echo "== rule-based, relative to the GPT-4 answers"
"$PYTHON" -m llava_drip.eval.summarize_gpt_review -f "$REVIEWS/rule.jsonl"
