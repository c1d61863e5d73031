"""Answer a LLaVA ScienceQA question file (e.g. ``llava_test_CQM-A.json``), as LLaVA's
``llava/eval/model_vqa_science.py`` does (same flags and defaults), batched and resumable.

The prompt is the first human turn with any ``<image>`` removed, put back as a leading
``<image>\\n`` when the record has an image; ``--single-pred-prompt`` appends LLaVA's
"Answer with the option's letter from the given choices directly." on a new line;
``--answer-prompter`` asks a second time for the answer after the first reply, as LLaVA does.

    python -m llava_drip.eval.model_vqa_science --model-path M --question-file llava_test_CQM-A.json \\
        --image-folder images/test --answers-file answers/M.jsonl --single-pred-prompt \\
        --temperature 0 --conv-mode vicuna_v1 [--batch-size 8]

``python llava_drip/eval/model_vqa_science.py ...`` works too.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if not __package__:  # run as a file (python llava_drip/eval/X.py): import this checkout's package
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from llava_drip.constants import DEFAULT_IMAGE_TOKEN
from llava_drip.eval.answering import SINGLE_PRED_PROMPT, Question, add_common_args, answer_questions, check_unique_ids
from llava_drip.eval.io_utils import read_json


def load_questions(path: str, image_folder: str, single_pred_prompt: bool) -> list[Question]:
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{id, image?, conversations}}, got {type(data).__name__}")
    questions = []
    for i, rec in enumerate(data):
        try:
            qid, turn = rec["id"], rec["conversations"][0]["value"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{path}: question #{i} needs 'id' and a first conversation turn, got {str(rec)[:200]}") from None
        text = turn.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        prompt = text
        image = None
        if rec.get("image"):
            image = os.path.join(image_folder, rec["image"])
            prompt = f"{DEFAULT_IMAGE_TOKEN}\n{prompt}"
        if single_pred_prompt:
            text = f"{text}\n{SINGLE_PRED_PROMPT}"
            prompt = f"{prompt}\n{SINGLE_PRED_PROMPT}"
        questions.append(Question(qid=qid, text=text, prompt=prompt, image=image))
    return check_unique_ids(path, questions)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    # LLaVA's default; LLaVA-1.5's scripts, and ours, pass --conv-mode vicuna_v1
    add_common_args(parser, conv_mode="llava_v0")
    parser.add_argument("--answer-prompter", action="store_true",
                        help="LLaVA's two-pass prompting: ask again for the answer after ' ###\\nANSWER:'")
    parser.add_argument("--single-pred-prompt", action="store_true",
                        help="append LLaVA's \"Answer with the option's letter ...\" instruction")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    questions = load_questions(args.question_file, args.image_folder, args.single_pred_prompt)
    return answer_questions(questions, args, answer_prompter=args.answer_prompter)


if __name__ == "__main__":
    main()
    raise SystemExit(0)
