"""Score ScienceQA answers the way LLaVA's ``llava/eval/eval_science_qa.py`` does (same flags).

Answer parsing follows LLaVA exactly (checked against every ``parsed_ans`` in LLaVA-1.5-13B's
published output file): the text itself if it is an option letter; else its first character when
it reads ``"X. ..."``; else the letter of a single ``"The answer is X."``; else ``FAILED``. LLaVA
then draws a random option for FAILED; here FAILED is always wrong, and the count is reported.

The questions come from either source:

- ``--base-dir DIR`` alone, as LLaVA's scripts call it: ScienceQA's ``DIR/problems.json`` and the
  ``--split`` ids (default ``test``) of ``DIR/pid_splits.json``; the per-category table
  (NAT/SOC/LAN subjects, TXT/IMG/NO context, G1-6/G7-12 grades) comes with them.
- ``--question-file``: a LLaVA question file (``llava_test_CQM-A.json`` or ``convert_sqa``'s
  output) gives the questions, gold letters and options; ``--base-dir`` then only adds the table
  from its ``problems.json``.

    python llava_drip/eval/eval_science_qa.py --base-dir DIR --result-file R \
        --output-file R_output.jsonl --output-result R_result.json
    python -m llava_drip.eval.eval_science_qa --question-file Q --result-file R [--base-dir DIR] [--json]
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as a file (python llava_drip/eval/X.py): import this checkout's package
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from llava_drip.eval.convert_sqa import convert
from llava_drip.eval.io_utils import read_json, read_jsonl_by_id, write_json

logger = logging.getLogger(__name__)

OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


@dataclass(frozen=True)
class SqaQuestion:
    qid: str
    prompt: str
    answer: str  # gold option letter
    choices: tuple[str, ...]
    has_image: bool


def parse_answer(text: str, options: tuple[str, ...] = OPTIONS) -> str:
    """LLaVA's answer parsing: an option letter, or ``FAILED``."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def parse_choices(prompt: str, options: tuple[str, ...] = OPTIONS) -> list[str]:
    """Option texts of a CQM-A prompt: the block from the last ``A. `` line on.

    Choices may span lines (letter sign-offs, poems), so each option runs to the next letter's
    line rather than to the end of its own line.
    """
    text = "\n" + prompt
    starts = [text.rfind(f"\n{options[0]}. ")]
    if starts[0] < 0:
        return []
    for letter in options[1:]:
        nxt = text.find(f"\n{letter}. ", starts[-1] + 1)
        if nxt < 0:
            break
        starts.append(nxt)
    starts.append(len(text))
    return [text[a + 4 : b] for a, b in zip(starts, starts[1:])]


def load_questions(path: str | Path, options: tuple[str, ...] = OPTIONS) -> dict[str, SqaQuestion]:
    """Read a LLaVA ScienceQA question file (JSON list of ``{id, image?, conversations}``)."""
    return questions_from_records(read_json(path), path, options)


def questions_from_records(data: list, path: str | Path, options: tuple[str, ...] = OPTIONS) -> dict[str, SqaQuestion]:
    """LLaVA question records to ``SqaQuestion``s; ``path`` names the source in errors."""
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    questions: dict[str, SqaQuestion] = {}
    for i, rec in enumerate(data):
        convs = rec.get("conversations") if isinstance(rec, dict) else None
        if not convs or len(convs) < 2 or "id" not in rec:
            raise ValueError(f"{path}: question #{i} needs 'id' and a human + gpt conversation, got {str(rec)[:200]}")
        qid = str(rec["id"])
        if qid in questions:
            raise ValueError(f"{path}: question #{i}: duplicate id {qid!r}")
        prompt, answer = convs[0]["value"], convs[1]["value"].strip()
        if answer not in options:
            raise ValueError(f"{path}: question {qid}: answer {answer!r} is not one of {options} (not a CQM-A file?)")
        questions[qid] = SqaQuestion(qid, prompt, answer, tuple(parse_choices(prompt, options)), "image" in rec)
    return questions


def load_split(base_dir: str | Path, split: str, options: tuple[str, ...] = OPTIONS) -> tuple[dict[str, SqaQuestion], dict]:
    """``(questions, problems)`` of ``split``, from ``base_dir``'s problems.json and pid_splits.json.

    The problems go through ``convert_sqa`` (LLaVA's CQM-A layout), so both question sources are
    read by the same code.
    """
    base_dir = Path(base_dir)
    problems = read_json(base_dir / "problems.json")
    splits_path = base_dir / "pid_splits.json"
    splits = read_json(splits_path)
    if split not in splits:
        raise KeyError(f"split {split!r} not in {splits_path}; available: {sorted(splits)}")
    records = convert(problems, [str(p) for p in splits[split]])
    return questions_from_records(records, f"{base_dir}[{split}]", options), problems


def parse_options(values: list[str]) -> tuple[str, ...]:
    """``--options A B C`` or LLaVA's ``--options ABC`` (its ``type=list`` splits the string)."""
    letters = list(values[0]) if len(values) == 1 else list(values)
    if not letters or len(set(letters)) != len(letters):
        raise ValueError(f"--options must be distinct option letters, got {values}")
    return tuple(letters)


def problem_categories(problem: dict) -> list[str]:
    """ScienceQA's table columns a problem counts in (subject, context modality, grade band)."""
    cats = [_SUBJECTS[problem["subject"]]]
    has_text, has_image = bool(problem.get("hint")), bool(problem.get("image"))
    cats += [c for c, on in (("TXT", has_text), ("IMG", has_image), ("NO", not has_text and not has_image)) if on]
    grade = int(problem["grade"].removeprefix("grade"))
    cats.append("G1-6" if grade <= 6 else "G7-12")
    return cats


def _pct(num: int, den: int) -> float | None:
    # None (JSON null) rather than NaN when nothing was counted, e.g. no image questions.
    return 100.0 * num / den if den else None


def _fmt(x: float | None) -> str:
    return "   n/a" if x is None else f"{x:6.2f}"


def score(
    questions: dict[str, SqaQuestion],
    predictions: dict[str, dict],
    problems: dict[str, dict] | None = None,
    options: tuple[str, ...] = OPTIONS,
) -> dict:
    """Accuracy, IMG-accuracy and (with ``problems``) the per-category table.

    Args:
        questions: from ``load_questions``; defines which questions are scored.
        predictions: answers keyed by question id (``text`` and ``prompt`` fields, LLaVA's answers file).
        problems: ScienceQA ``problems.json`` content; only its entries for scored ids are used.

    Returns:
        A dict: ``accuracy``, ``img_accuracy`` (percent), counts, ``categories`` (``{name:
        {accuracy, count}}``, empty without problems), ``results`` (predicted option index per id,
        -1 when unparsed, as LLaVA's --output-result), ``outputs`` and ``analysis`` (LLaVA's
        --output-file content).
    """
    extra = set(predictions) - set(questions)
    if extra:
        logger.warning("%d answers have ids not in the question file (ignored), e.g. %s", len(extra), sorted(extra)[:5])
    analysis: dict[str, list] = {"correct": [], "incorrect": []}
    results, outputs = {}, {}
    cat_hits = {c: [0, 0] for c in CATEGORIES}
    num_failed = num_missing = num_with_meta = 0
    for qid, q in questions.items():
        pred = predictions.get(qid)
        if pred is None:
            num_missing += 1
            text, prompt = FAILED, q.prompt
        else:
            text, prompt = pred["text"], pred.get("prompt", q.prompt)
        letter = parse_answer(text, options)
        num_failed += letter == FAILED
        num_choices = len(q.choices)
        problem = problems.get(qid) if problems else None
        if problem is not None:
            if options[problem["answer"]] != q.answer:
                raise ValueError(f"question {qid}: problems.json answer {options[problem['answer']]} != question file {q.answer}")
            num_choices = len(problem["choices"])
        pred_idx = options.index(letter) if letter in options[:num_choices] else -1
        correct = letter == q.answer and pred_idx >= 0
        results[qid], outputs[qid] = pred_idx, text
        analysis["correct" if correct else "incorrect"].append({
            "question_id": qid, "parsed_ans": letter, "ground_truth": q.answer,
            "question": prompt, "pred": text, "is_multimodal": q.has_image,
        })
        if problem is not None:
            num_with_meta += 1
            for c in problem_categories(problem):
                cat_hits[c][0] += correct
                cat_hits[c][1] += 1
    num_correct = len(analysis["correct"])
    img_correct = sum(a["is_multimodal"] for a in analysis["correct"])
    img_total = sum(q.has_image for q in questions.values())
    categories = {}
    if num_with_meta:
        categories = {c: {"accuracy": _pct(h, n), "count": n} for c, (h, n) in cat_hits.items()}
    return {
        "accuracy": _pct(num_correct, len(questions)),
        "img_accuracy": _pct(img_correct, img_total),
        "correct": num_correct, "total": len(questions),
        "img_correct": img_correct, "img_total": img_total,
        "failed": num_failed, "missing": num_missing,
        "categories": categories, "categories_count": num_with_meta,
        "results": results, "outputs": outputs, "analysis": analysis,
    }


def format_report(res: dict) -> str:
    lines = [
        f"Total: {res['total']}, Correct: {res['correct']}, Accuracy: {_fmt(res['accuracy']).strip()}%, "
        f"IMG-Accuracy: {_fmt(res['img_accuracy']).strip()}% ({res['img_correct']}/{res['img_total']})",
        f"Unparsed answers (counted wrong): {res['failed']}; questions without an answer: {res['missing']}",
    ]
    if res["categories"]:
        if res["categories_count"] < res["total"]:
            lines.append(f"Categories over the {res['categories_count']} of {res['total']} questions found in problems.json")
        lines.append("  ".join(f"{c:>6}" for c in (*CATEGORIES, "Avg")))
        cat_acc = [res["categories"][c]["accuracy"] for c in CATEGORIES]
        lines.append("  ".join(_fmt(a) for a in (*cat_acc, res["accuracy"])))
        lines.append("  ".join(f"{n:>6}" for n in (*(res["categories"][c]["count"] for c in CATEGORIES), res["total"])))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score ScienceQA answers with LLaVA's parsing rules.")
    parser.add_argument("--base-dir", type=Path,
                        help="ScienceQA folder with problems.json and pid_splits.json (LLaVA's way: the questions "
                             "of --split, and the category table)")
    parser.add_argument("--result-file", type=Path, required=True, help="answers JSONL from model_vqa_science")
    parser.add_argument("--output-file", type=Path, help="write LLaVA's per-question analysis ({correct, incorrect})")
    parser.add_argument("--output-result", type=Path, help="write LLaVA's result JSON (acc, correct, count, results, outputs)")
    parser.add_argument("--split", default="test", help="key of pid_splits.json with --base-dir (default test)")
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), help="option letters (default A B C D E)")
    parser.add_argument("--question-file", type=Path,
                        help="LLaVA question file (e.g. llava_test_CQM-A.json) instead of problems.json's split; "
                             "--base-dir then only adds the category table")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of the text report")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.question_file is None and args.base_dir is None:
        parser.error("give --base-dir (ScienceQA's problems.json + pid_splits.json) or --question-file")

    options = parse_options(args.options)
    problems = None
    if args.question_file is not None:
        questions = load_questions(args.question_file, options)
        if args.base_dir is not None:
            problems = read_json(args.base_dir / "problems.json")
    else:
        questions, problems = load_split(args.base_dir, args.split, options)
    predictions = read_jsonl_by_id(args.result_file, "question_id")
    for qid, pred in predictions.items():
        if "text" not in pred:
            raise ValueError(f"{args.result_file}: answer {qid!r} has no 'text' field")
    res = score(questions, predictions, problems, options)

    if args.output_file:
        write_json(args.output_file, res["analysis"])
    if args.output_result:
        write_json(args.output_result, {
            "acc": res["accuracy"], "correct": res["correct"], "count": res["total"],
            "results": res["results"], "outputs": res["outputs"],
        })
    if args.json:
        summary = {k: v for k, v in res.items() if k not in ("results", "outputs", "analysis")}
        print(json.dumps(summary, indent=2))
    else:
        print(format_report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
