"""Turn an MME answers JSONL into the per-subtask ``.txt`` files of MME's eval_tool, as LLaVA's
``playground/data/eval/MME/convert_answer_to_mme.py`` does (same ``--experiment`` call).

Each answer (``question_id`` = ``"<subtask>/[images/]<image>"``, ``prompt``, ``text``) becomes
one line of ``<output-dir>/<subtask>.txt``::

    <image stem>.txt <TAB> question <TAB> ground truth <TAB> answer

LLaVA's rules, kept: the question is the answer's ``prompt`` without LLaVA's "Answer the question
using a single word or phrase." and with MME's " Please answer yes or no." put back (or with the
two spaces a few MME questions have, whichever MME's files hold); the ground truth is looked up by
(subtask, image stem, question); lines keep the answers' order within a subtask.

The ground truth comes from either:

- ``--data-path``: MME's release folder (``MME_Benchmark_release_version``, LLaVA's way):
  ``<subtask>/questions_answers_YN/<stem>.txt`` or ``<subtask>/<stem>.txt``, lines
  ``question<TAB>yes/no``;
- ``--gt-dir``: a folder of eval_tool files already made (``<subtask>.txt``, the four columns
  above); their third column is the ground truth, their predictions are ignored.

Where this differs, on purpose: an answer whose question has no ground truth is skipped and
counted (LLaVA stops with a KeyError); with ``--question-file`` (``llava_mme.jsonl``) questions
without an answer are counted too, and lines follow the question file's order (so answers merged
from chunks in any order still pair up); tabs and line breaks inside an answer become spaces, as
they would break the four-column format.

LLaVA's ``llava_mme.jsonl`` gives both questions of an image the same ``question_id``, which
``model_vqa`` refuses (it keys and resumes answers by id); ``--unique-ids-to FILE`` writes a copy
of ``--question-file`` whose ids end in ``#1``, ``#2`` (``existence/x.png#2``). Both this
converter and LLaVA's read the subtask and image from such ids unchanged, and answers match
questions here with or without the suffix.

    cd playground/data/eval/MME && python -m llava_drip.eval.convert_answer_to_mme --experiment NAME
    python -m llava_drip.eval.convert_answer_to_mme --answers-file A.jsonl --data-path MME_Benchmark_release_version \\
        --output-dir eval_tool/answers/NAME [--question-file llava_mme.jsonl]
    python -m llava_drip.eval.convert_answer_to_mme --question-file llava_mme.jsonl --unique-ids-to questions.jsonl
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import defaultdict
from pathlib import Path

if not __package__:  # run as a file (python llava_drip/eval/X.py): import this checkout's package
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from llava_drip.eval.io_utils import _atomic_write_text, iter_jsonl, write_jsonl

logger = logging.getLogger(__name__)

LLAVA_SUFFIX = "Answer the question using a single word or phrase."
MME_SUFFIX = "Please answer yes or no."
GtKey = tuple[str, str, str]  # (subtask, image stem + ".txt", question)


_ID_SUFFIX = re.compile(r"#\d+$")


def base_id(qid) -> str:
    """LLaVA's question id without the ``#n`` that ``--unique-ids-to`` adds."""
    return _ID_SUFFIX.sub("", str(qid))


def unique_id_questions(question_path: Path) -> list[dict]:
    """The question file with ``#n`` (n-th question of that id) appended to every id."""
    seen: dict[str, int] = defaultdict(int)
    out = []
    for lineno, q in iter_jsonl(question_path):
        if "question_id" not in q:
            raise ValueError(f"{question_path}:{lineno}: no 'question_id' field (keys: {sorted(q)})")
        qid = base_id(q["question_id"])
        seen[qid] += 1
        out.append({**q, "question_id": f"{qid}#{seen[qid]}"})
    return out


def split_question_id(qid: str) -> tuple[str, str]:
    """``"landmark/images/x.jpg"`` -> ``("landmark", "x.txt")``: LLaVA's subtask and eval_tool file name."""
    parts = base_id(qid).split("/")
    if len(parts) < 2 or not parts[0] or not parts[-1]:
        raise ValueError(f"question_id {qid!r} is not '<subtask>/<image>' (is this an MME answers file?)")
    return parts[0], parts[-1].split(".")[0] + ".txt"


def gt_from_release(data_path: Path) -> dict[GtKey, str]:
    """Ground truth from MME's release folder (each subtask's question/answer .txt files)."""
    if not data_path.is_dir():
        raise FileNotFoundError(f"--data-path {data_path}: not a folder (MME_Benchmark_release_version)")
    gt: dict[GtKey, str] = {}
    for sub in sorted(p for p in data_path.iterdir() if p.is_dir()):
        qa_dir = sub / "questions_answers_YN" if (sub / "images").is_dir() else sub
        if not qa_dir.is_dir():
            raise FileNotFoundError(f"{sub}: has images/ but no questions_answers_YN/")
        for txt in sorted(qa_dir.glob("*.txt")):
            with open(txt, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    fields = line.strip().split("\t")
                    if len(fields) != 2:
                        raise ValueError(f"{txt}:{lineno}: expected 'question<TAB>answer', got {len(fields)} fields")
                    gt[(sub.name, txt.name, fields[0])] = fields[1]
    if not gt:
        raise FileNotFoundError(f"{data_path}: no MME question/answer .txt files found")
    return gt


def read_eval_tool_file(path: Path) -> list[tuple[int, list[str]]]:
    """``(line number, [image, question, ground truth, prediction])`` per non-blank line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 4:
                raise ValueError(f"{path}:{lineno}: expected 4 tab-separated fields (image, question, "
                                 f"ground truth, prediction), got {len(fields)}")
            rows.append((lineno, fields))
    return rows


def gt_from_eval_tool(gt_dir: Path) -> dict[GtKey, str]:
    """Ground truth from a folder of eval_tool ``<subtask>.txt`` files (third column)."""
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"--gt-dir {gt_dir}: not a folder of eval_tool <subtask>.txt files")
    gt: dict[GtKey, str] = {}
    for txt in sorted(gt_dir.glob("*.txt")):
        for _, (image, question, answer, _pred) in read_eval_tool_file(txt):
            gt[(txt.stem, image, question)] = answer
    if not gt:
        raise FileNotFoundError(f"{gt_dir}: no eval_tool <subtask>.txt files")
    return gt


def mme_question(prompt: str, subtask: str, file: str, gt: dict[GtKey, str]) -> str:
    """LLaVA's prompt -> MME's question text (the form MME's ground truth holds, when it holds one)."""
    q = prompt.replace(LLAVA_SUFFIX, "").strip() if LLAVA_SUFFIX in prompt else prompt
    if MME_SUFFIX not in q:
        single, double = f"{q} {MME_SUFFIX}", f"{q}  {MME_SUFFIX}"
        # a few MME questions have two spaces before the suffix
        q = double if (subtask, file, single) not in gt and (subtask, file, double) in gt else single
    return q


_BREAKS = re.compile(r"[\t\r\n]")


def convert(answers: list[dict], gt: dict[GtKey, str], answers_path="answers file") -> tuple[dict[str, list[str]], dict]:
    """Answers -> ``{subtask: [eval_tool line, ...]}`` and counts ``{written, no_ground_truth, ...}``."""
    lines: dict[str, list[str]] = defaultdict(list)
    no_gt: list[str] = []
    for a in answers:
        for key in ("prompt", "text"):
            if not isinstance(a.get(key), str):
                raise ValueError(f"{answers_path}: answer {a.get('question_id')!r} has no string '{key}' "
                                 f"(keys: {sorted(a)})")
        try:
            subtask, file = split_question_id(a.get("question_id"))
        except ValueError as e:
            raise ValueError(f"{answers_path}: {e}") from None
        question = mme_question(a["prompt"], subtask, file, gt)
        answer = gt.get((subtask, file, question))
        if answer is None:
            no_gt.append(f"{a['question_id']}: {question}")
            continue
        lines[subtask].append("\t".join((file, question, answer, _BREAKS.sub(" ", a["text"]))))
    written = sum(map(len, lines.values()))
    if answers and not written:
        raise ValueError(f"{answers_path}: no answer matches a ground-truth question (e.g. {no_gt[0]}): "
                         "wrong answers file or ground truth?")
    return dict(lines), {"written": written, "no_ground_truth": len(no_gt), "no_ground_truth_examples": no_gt[:5]}


def order_by_questions(question_path: Path, answers: dict[str, list[dict]]) -> tuple[list[dict], list[str], int]:
    """Answers in question-file order; also the questions without an answer and the unused answers.

    MME ids name an image, not a question (two questions per image), so questions and answers are
    matched by (question_id without ``#n``, prompt).
    """
    ordered, missing, used = [], [], set()
    for lineno, q in iter_jsonl(question_path):
        if "question_id" not in q or "text" not in q:
            raise ValueError(f"{question_path}:{lineno}: a question needs 'question_id' and 'text' (keys: {sorted(q)})")
        key = (base_id(q["question_id"]), q["text"])
        if key in used:
            raise ValueError(f"{question_path}:{lineno}: question repeated: {key}")
        used.add(key)
        a = answers.get(key)
        if a is None:
            missing.append(f"{q['question_id']}: {q['text']}")
        else:
            ordered.append(a)
    unused = sum(k not in used for k in answers)
    return ordered, missing, unused


def read_answers(path: Path) -> dict[tuple[str, str], dict]:
    """Answers keyed by (question_id without ``#n``, prompt), in file order."""
    out: dict[tuple[str, str], dict] = {}
    for lineno, a in iter_jsonl(path):
        if "question_id" not in a or "prompt" not in a:
            raise ValueError(f"{path}:{lineno}: an answer needs 'question_id' and 'prompt' (keys: {sorted(a)})")
        key = (base_id(a["question_id"]), a["prompt"])
        if key in out:
            raise ValueError(f"{path}:{lineno}: a second answer to {key}")
        out[key] = a
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write MME eval_tool files from an MME answers JSONL.")
    parser.add_argument("--experiment", help="LLaVA's call, from the MME folder: answers/EXPERIMENT.jsonl -> "
                                             "eval_tool/answers/EXPERIMENT/, ground truth from MME_Benchmark_release_version")
    parser.add_argument("--answers-file", type=Path, help="answers JSONL (default: answers/EXPERIMENT.jsonl)")
    parser.add_argument("--output-dir", type=Path, help="folder for <subtask>.txt (default: eval_tool/answers/EXPERIMENT)")
    gt = parser.add_mutually_exclusive_group()
    gt.add_argument("--data-path", type=Path, help="MME's release folder (default: MME_Benchmark_release_version)")
    gt.add_argument("--gt-dir", type=Path, help="ground truth from eval_tool <subtask>.txt files instead (third column)")
    parser.add_argument("--question-file", type=Path, help="llava_mme.jsonl: count unanswered questions, keep its order")
    parser.add_argument("--unique-ids-to", type=Path, metavar="FILE",
                        help="only write --question-file with ids made unique (#1, #2) for model_vqa, and exit")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.unique_ids_to:
        if not args.question_file:
            parser.error("--unique-ids-to needs --question-file")
        rows = unique_id_questions(args.question_file)
        write_jsonl(args.unique_ids_to, rows)
        print(f"{args.unique_ids_to}: {len(rows)} questions with unique ids")
        return 0
    if args.experiment is None and (args.answers_file is None or args.output_dir is None):
        parser.error("give --experiment NAME (LLaVA's layout) or both --answers-file and --output-dir")
    answers_path = args.answers_file or Path("answers") / f"{args.experiment}.jsonl"
    output_dir = args.output_dir or Path("eval_tool") / "answers" / args.experiment
    gt = gt_from_eval_tool(args.gt_dir) if args.gt_dir else gt_from_release(args.data_path or Path("MME_Benchmark_release_version"))

    if args.question_file:
        answers, missing, unused = order_by_questions(args.question_file, read_answers(answers_path))
    else:
        # LLaVA's converter takes the answers as they come; ids repeat (two questions an image)
        answers, missing, unused = [a for _, a in iter_jsonl(answers_path)], [], 0
    lines, counts = convert(answers, gt, answers_path)
    output_dir.mkdir(parents=True, exist_ok=True)
    for subtask, rows in lines.items():
        _atomic_write_text(output_dir / f"{subtask}.txt", "".join(r + "\n" for r in rows))
    counts.update(output_dir=str(output_dir), subtasks=sorted(lines), no_answer=len(missing),
                  no_answer_examples=missing[:5], answers_not_in_question_file=unused)
    if args.json:
        print(json.dumps(counts, indent=2))
    else:
        print(f"{output_dir}: {counts['written']} lines in {len(lines)} subtask files")
        if counts["no_ground_truth"]:
            print(f"SKIPPED {counts['no_ground_truth']} answers whose question has no ground truth, "
                  f"e.g. {counts['no_ground_truth_examples'][:2]}")
        if missing:
            print(f"SKIPPED {len(missing)} questions of {args.question_file} without an answer, e.g. {missing[:2]}")
        if unused:
            print(f"{unused} answers to questions not in {args.question_file} (ignored)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
