"""Answer a LLaVA-Bench question file (JSONL of ``{question_id, image, text, category}``), as LLaVA's
``llava/eval/model_vqa.py`` does (same flags and defaults), batched and resumable.

The human turn is ``<image>\\n`` + the question; the answer's ``prompt`` is the question alone.

    python -m llava_drip.eval.model_vqa --model-path M --question-file questions.jsonl \\
        --image-folder images --answers-file answers/M.jsonl --temperature 0 --conv-mode vicuna_v1

``python llava_drip/eval/model_vqa.py ...`` works too.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if not __package__:  # run as a file (python llava_drip/eval/X.py): import this checkout's package
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from llava_drip.eval.answering import Question, add_common_args, answer_questions, check_unique_ids
from llava_drip.eval.io_utils import iter_jsonl


def load_questions(path: str, image_folder: str) -> list[Question]:
    questions = []
    for lineno, rec in iter_jsonl(path):
        if "question_id" not in rec or "text" not in rec:
            raise ValueError(f"{path}:{lineno}: a question needs 'question_id' and 'text' (keys: {sorted(rec)})")
        image = os.path.join(image_folder, rec["image"]) if rec.get("image") else None
        questions.append(Question(qid=rec["question_id"], text=rec["text"], prompt=rec["text"], image=image))
    return check_unique_ids(path, questions)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_common_args(parser, conv_mode="llava_v1")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return answer_questions(load_questions(args.question_file, args.image_folder), args)


if __name__ == "__main__":
    main()
    raise SystemExit(0)
