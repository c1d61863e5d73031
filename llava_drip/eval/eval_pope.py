"""Score POPE answers the way LLaVA's ``llava/eval/eval_pope.py`` does (same flags).

Inputs, in LLaVA's formats:

- ``--question-file``: LLaVA's ``llava_pope_test.jsonl`` (``question_id, image, text, category``).
- ``--result-file``: answers JSONL (``question_id, text``) from ``model_vqa``.
- ``--annotation-dir``: POPE's label files ``coco_pope_{category}.json`` (one JSON object a
  line: ``question_id, image, text, label`` yes/no), one file per category.

LLaVA's rules, kept:

- An answer is read from its first sentence (the text before the first ``.``), commas removed,
  split on single spaces: ``No``, ``no`` or ``not`` among the words means *no*, anything else
  *yes* (so ``NO``, ``Not`` or an empty answer count as yes).
- The n-th question of a category in the question file goes with the n-th label of its label
  file: POPE's ids restart at 1 in every file, so LLaVA pairs by position, not by id.
- TP/FP/TN/FN with *yes* as the positive class; accuracy, precision, recall, F1, yes-ratio.

Where this differs, on purpose: answers are joined to questions by ``question_id``, so a missing
answer is counted and reported instead of shifting every later label by one (LLaVA zips the
answers of a category with its labels); the pairing is checked (same image, question text
starting with the label's text) so a label file of another POPE version fails loudly; figures are
percent; the mean F1 over the categories is reported (LLaVA-1.5's POPE figure).

    python llava_drip/eval/eval_pope.py --annotation-dir DIR/coco --question-file Q --result-file R
    python -m llava_drip.eval.eval_pope ... [--json] [--output-result R_result.json] [--strict]
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

from llava_drip.eval.io_utils import iter_jsonl, read_jsonl_by_id, write_json

logger = logging.getLogger(__name__)

LABEL_FILE = re.compile(r"^coco_pope_(.+)\.json$")
_NO_WORDS = {"No", "no", "not"}
_YES_WORDS = {"Yes", "yes"}
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def _first_sentence_words(text: str) -> list[str]:
    # LLaVA: text before the first '.', commas dropped, split on ' ' (not on any whitespace)
    return text.split(".")[0].replace(",", "").split(" ")


def parse_answer(text: str) -> str:
    """LLaVA's reading of a POPE answer: ``"no"`` or ``"yes"``."""
    return "no" if _NO_WORDS.intersection(_first_sentence_words(text)) else "yes"


def is_default_yes(text: str) -> bool:
    """True when the first sentence holds neither a no-word nor yes: LLaVA scores it yes anyway."""
    words = set(_first_sentence_words(text))
    return not (words & _NO_WORDS) and not (words & _YES_WORDS)


@dataclass(frozen=True)
class Label:
    question_id: object
    image: str | None
    text: str | None
    label: str  # "yes" / "no"


def load_labels(path: Path) -> list[Label]:
    """A POPE label file, in file order."""
    labels = []
    for lineno, rec in iter_jsonl(path):
        if rec.get("label") not in ("yes", "no"):
            raise ValueError(f"{path}:{lineno}: 'label' must be \"yes\" or \"no\", got {rec.get('label')!r} "
                             f"(keys: {sorted(rec)}; is this a POPE label file?)")
        labels.append(Label(rec.get("question_id"), rec.get("image"), rec.get("text"), rec["label"]))
    if not labels:
        raise ValueError(f"{path}: no labels")
    return labels


def find_label_files(annotation_dir: Path) -> dict[str, Path]:
    """``{category: coco_pope_<category>.json}`` found in ``annotation_dir``, sorted by category."""
    if not annotation_dir.is_dir():
        raise FileNotFoundError(f"--annotation-dir {annotation_dir}: not a folder (POPE's coco/ with coco_pope_*.json)")
    found = {}
    for p in sorted(annotation_dir.iterdir()):
        m = LABEL_FILE.match(p.name)
        if m:
            found[m.group(1)] = p
        else:  # LLaVA asserts every file there is a label file; a stray file is only worth a warning
            logger.warning("%s: not a coco_pope_<category>.json label file (ignored)", p)
    if not found:
        raise FileNotFoundError(f"{annotation_dir}: no coco_pope_<category>.json label files")
    return found


def load_questions(path: Path) -> dict[str, list[dict]]:
    """Questions by category, each list in file order."""
    by_cat: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for lineno, rec in iter_jsonl(path):
        for key in ("question_id", "category"):
            if key not in rec:
                raise ValueError(f"{path}:{lineno}: no '{key}' field (keys: {sorted(rec)}; is this LLaVA's "
                                 "llava_pope_test.jsonl?)")
        qid = str(rec["question_id"])
        if qid in seen:
            raise ValueError(f"{path}:{lineno}: duplicate question_id {rec['question_id']!r}")
        seen.add(qid)
        by_cat.setdefault(str(rec["category"]), []).append(rec)
    return by_cat


def check_pairing(category: str, questions: list[dict], labels: list[Label], question_path, label_path) -> None:
    """The n-th question must be the n-th label's question: same image, text starting with the label's."""
    if len(questions) != len(labels):
        raise ValueError(f"{label_path}: {len(labels)} labels but {question_path} has {len(questions)} "
                         f"questions of category {category!r}; they pair in file order, so the counts must match")
    for i, (q, lab) in enumerate(zip(questions, labels)):
        same_image = lab.image is None or q.get("image") is None or q["image"] == lab.image
        same_text = lab.text is None or str(q.get("text", "")).startswith(lab.text)
        if not (same_image and same_text):
            raise ValueError(
                f"{label_path}: label #{i + 1} (question_id {lab.question_id!r}, {lab.image}, {lab.text!r}) is not "
                f"question {q['question_id']!r} of {question_path} ({q.get('image')}, {str(q.get('text'))[:80]!r}); "
                "labels pair with the category's questions in file order: is this the POPE label version "
                "LLaVA's question file was made from?")


def _pct(num: int, den: int) -> float | None:
    return 100.0 * num / den if den else None


def confusion_metrics(preds: list[str], labels: list[str]) -> dict:
    """TP/FP/TN/FN (yes = positive) and LLaVA's five figures, in percent (None when undefined)."""
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, labels))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, labels))
    tn = sum(p == "no" and g == "no" for p, g in zip(preds, labels))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, labels))
    precision, recall = _pct(tp, tp + fp), _pct(tp, tp + fn)
    f1 = None
    if precision is not None and recall is not None and precision + recall > 0:
        f1 = 2 * precision * recall / (precision + recall)
    return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": _pct(tp + tn, len(preds)),
            "precision": precision, "recall": recall, "f1": f1, "yes_ratio": _pct(preds.count("yes"), len(preds))}


def score(questions: dict[str, list[dict]], label_files: dict[str, Path], answers: dict[str, dict],
          question_path="question file", result_path="result file") -> dict:
    """Per-category metrics, mean F1 and the counts of what could not be scored.

    Args:
        questions: ``load_questions`` output.
        label_files: ``find_label_files`` output; its categories are the ones scored.
        answers: answers keyed by ``str(question_id)`` (``read_jsonl_by_id``).
    """
    for a in answers.values():
        if not isinstance(a.get("text"), str):
            raise ValueError(f"{result_path}: answer to question_id {a.get('question_id')!r} has no text "
                             f"(got {a.get('text')!r})")
    known = {str(q["question_id"]) for qs in questions.values() for q in qs}
    extra = [k for k in answers if k not in known]
    if answers and len(extra) == len(answers):
        raise ValueError(f"{result_path}: none of its {len(answers)} answers is to a question of {question_path} "
                         f"(e.g. question_id {extra[0]!r}): wrong answers or question file?")
    if extra:
        logger.warning("%s: %d answers to questions not in %s (ignored), e.g. %s", result_path, len(extra),
                       question_path, extra[:5])
    unlabelled = sorted(set(questions) - set(label_files))
    if unlabelled:
        logger.warning("no label file for categories %s of %s (not scored)", unlabelled, question_path)

    categories, missing_ids = {}, []
    for cat, path in label_files.items():
        if cat not in questions:
            raise ValueError(f"{path}: {question_path} has no question of category {cat!r} "
                             f"(its categories: {sorted(questions)})")
        labels = load_labels(path)
        check_pairing(cat, questions[cat], labels, question_path, path)
        preds, golds, default_yes, missing = [], [], 0, []
        for q, lab in zip(questions[cat], labels):
            ans = answers.get(str(q["question_id"]))
            if ans is None:
                missing.append(q["question_id"])
                continue
            preds.append(parse_answer(ans["text"]))
            golds.append(lab.label)
            default_yes += is_default_yes(ans["text"])
        res = confusion_metrics(preds, golds)
        res.update(questions=len(labels), answered=len(preds), missing=len(missing), default_yes=default_yes)
        categories[cat] = res
        missing_ids += missing
    f1s = [c["f1"] for c in categories.values()]
    return {
        "categories": categories,
        "mean_f1": sum(f1s) / len(f1s) if f1s and None not in f1s else None,
        "mean_accuracy": (sum(c["accuracy"] for c in categories.values()) / len(categories)
                          if all(c["accuracy"] is not None for c in categories.values()) else None),
        "questions": sum(c["questions"] for c in categories.values()),
        "answered": sum(c["answered"] for c in categories.values()),
        "missing": len(missing_ids), "missing_ids": missing_ids[:20],
        "default_yes": sum(c["default_yes"] for c in categories.values()),
        "extra_answers": len(extra), "unlabelled_categories": unlabelled,
    }


def _fmt(x: float | None) -> str:
    return "   n/a" if x is None else f"{x:6.2f}"


def format_report(res: dict) -> str:
    header = (f"{'category':<12} {'n':>5} {'TP':>5} {'FP':>5} {'TN':>5} {'FN':>5} "
              f"{'acc':>6} {'prec':>6} {'recall':>6} {'F1':>6} {'yes%':>6}")
    lines = [header]
    for cat, c in res["categories"].items():
        lines.append(f"{cat:<12} {c['answered']:>5} {c['TP']:>5} {c['FP']:>5} {c['TN']:>5} {c['FN']:>5} "
                     + " ".join(_fmt(c[m]) for m in METRICS))
    lines.append(f"Mean F1: {_fmt(res['mean_f1']).strip()}  (mean accuracy {_fmt(res['mean_accuracy']).strip()}; "
                 f"{res['answered']} of {res['questions']} questions answered)")
    if res["missing"]:
        lines.append(f"WARNING {res['missing']} questions have no answer and are left out of the figures, "
                     f"e.g. question_id {res['missing_ids'][:5]}")
    if res["default_yes"]:
        lines.append(f"{res['default_yes']} answers say neither yes nor no in their first sentence "
                     "(scored yes, as LLaVA does)")
    if res["extra_answers"]:
        lines.append(f"{res['extra_answers']} answers to questions not in the question file (ignored)")
    if res["unlabelled_categories"]:
        lines.append(f"categories without a label file (not scored): {', '.join(res['unlabelled_categories'])}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score POPE answers with LLaVA's rules (F1 per category, mean F1).")
    parser.add_argument("--annotation-dir", type=Path, required=True,
                        help="POPE's label folder (coco/ with coco_pope_{adversarial,popular,random}.json)")
    parser.add_argument("--question-file", type=Path, required=True, help="LLaVA's llava_pope_test.jsonl")
    parser.add_argument("--result-file", type=Path, required=True, help="answers JSONL from model_vqa")
    parser.add_argument("--output-result", type=Path, help="write the figures as JSON")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of the text report")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a question has no answer")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = score(load_questions(args.question_file), find_label_files(args.annotation_dir),
                read_jsonl_by_id(args.result_file, "question_id"), args.question_file, args.result_file)
    if args.output_result:
        write_json(args.output_result, res)
    print(json.dumps(res, indent=2) if args.json else format_report(res))
    if args.strict and res["missing"]:
        print(f"--strict: {res['missing']} questions have no answer in {args.result_file}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
