"""LLaVA's ``llava/eval/eval_gpt_review_bench.py`` under its own name: the LLaVA-Bench LLM judge.

The same command as ``llava_drip.eval.judge_llava_bench`` (flags, defaults, review files), so
LLaVA's ``scripts/v1_5/eval/llavabench.sh`` runs with ``llava`` replaced by ``llava_drip``. The
judge model is LLaVA's ``gpt-4-0314`` unless ``--model`` or ``$JUDGE_MODEL`` says otherwise; the
openai client takes the key from ``$OPENAI_API_KEY`` and the endpoint from ``$OPENAI_BASE_URL``.

    python llava_drip/eval/eval_gpt_review_bench.py --question questions.jsonl --context context.jsonl \\
        --rule llava_drip/eval/table/rule.json --answer-list answers_gpt4.jsonl answers/NAME.jsonl \\
        --output reviews/NAME.jsonl
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file (python llava_drip/eval/X.py): import this checkout's package
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from llava_drip.eval.judge_llava_bench import main

if __name__ == "__main__":
    raise SystemExit(main(prog="eval_gpt_review_bench"))
