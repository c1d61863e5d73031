"""Score MME eval_tool files the way MME's ``eval_tool/calculation.py`` does (same ``--results_dir``).

``--results_dir`` holds one ``<subtask>.txt`` per subtask (``convert_answer_to_mme`` writes
them), lines ``image<TAB>question<TAB>ground truth<TAB>prediction``, the two questions of an
image on consecutive lines.

MME's rules, kept: a prediction is lower-cased; exactly ``yes``/``no`` is itself, otherwise its
first four characters decide: ``yes`` in them -> yes, else ``no`` in them -> no, else *other*
(always wrong). Per subtask: accuracy over questions and accuracy+ over images (both of an image's
questions right), each x100, score = accuracy + accuracy+; perception is the sum of the 10
perception subtasks' scores, cognition of the 4 cognition ones (full marks 2000 and 800).

Where this differs, on purpose: MME pairs lines two by two without looking; here the two lines of
a pair must name the same image, else the file is rejected (a reordered or filtered file would be
scored wrong without a word); a missing subtask file is reported and its sum marked incomplete
(MME's tool stops); the "other" answers are counted in the report.

    cd eval_tool && python -m llava_drip.eval.eval_mme --results_dir answers/NAME
    python -m llava_drip.eval.eval_mme --results-dir DIR [--json] [--output-result R.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if not __package__:  # run as a file (python llava_drip/eval/X.py): import this checkout's package
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from llava_drip.eval.convert_answer_to_mme import read_eval_tool_file
from llava_drip.eval.io_utils import write_json

logger = logging.getLogger(__name__)

EVAL_TYPES = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}


def parse_prediction(pred: str) -> str:
    """MME's reading of a prediction: ``"yes"``, ``"no"`` or ``"other"``."""
    pred = pred.lower()
    if pred in ("yes", "no"):
        return pred
    head = pred[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _pct(num: int, den: int) -> float | None:
    return 100.0 * num / den if den else None


def score_subtask(path: Path) -> dict:
    """One subtask file: accuracy, accuracy+, score and MME's confusion counts (other answers left out)."""
    rows = read_eval_tool_file(path)
    if not rows:
        raise ValueError(f"{path}: no lines")
    if len(rows) % 2:
        raise ValueError(f"{path}: {len(rows)} lines; MME scores questions in pairs (two per image), so the "
                         "count must be even")
    gts, preds = [], []
    pairs_right = 0
    for (line_a, a), (line_b, b) in zip(rows[::2], rows[1::2]):
        if a[0] != b[0]:
            raise ValueError(f"{path}:{line_a}-{line_b}: a pair of lines names two images ({a[0]}, {b[0]}); MME "
                             "scores the two questions of an image on consecutive lines")
        right = 0
        for lineno, (_, _, gt, pred) in ((line_a, a), (line_b, b)):
            gt = gt.lower()
            if gt not in ("yes", "no"):
                raise ValueError(f"{path}:{lineno}: ground truth must be yes or no, got {gt!r} (column 3)")
            p = parse_prediction(pred)
            gts.append(gt)
            preds.append(p)
            right += p == gt
        pairs_right += right == 2
    clean = [(g, p) for g, p in zip(gts, preds) if p != "other"]
    tp = sum(g == "yes" and p == "yes" for g, p in clean)
    fn = sum(g == "yes" and p == "no" for g, p in clean)
    fp = sum(g == "no" and p == "yes" for g, p in clean)
    tn = sum(g == "no" and p == "no" for g, p in clean)
    acc = _pct(sum(g == p for g, p in zip(gts, preds)), len(gts))
    acc_plus = _pct(pairs_right, len(rows) // 2)
    return {"questions": len(rows), "images": len(rows) // 2, "accuracy": acc, "accuracy_plus": acc_plus,
            "score": acc + acc_plus, "TP": tp, "FN": fn, "TN": tn, "FP": fp,
            "precision": _pct(tp, tp + fp), "recall": _pct(tp, tp + fn), "other": len(gts) - len(clean)}


def score(results_dir: Path) -> dict:
    """All subtasks found in ``results_dir``, the perception and cognition sums and what was missing."""
    if not results_dir.is_dir():
        raise FileNotFoundError(f"--results_dir {results_dir}: not a folder of eval_tool <subtask>.txt files")
    known = {t for tasks in EVAL_TYPES.values() for t in tasks}
    unknown = sorted(p.stem for p in results_dir.glob("*.txt") if p.stem not in known)
    if unknown:
        logger.warning("%s: files of no MME subtask (ignored): %s", results_dir, unknown)
    res: dict = {"subtasks": {}, "missing_subtasks": []}
    for eval_type, tasks in EVAL_TYPES.items():
        total, complete = 0.0, True
        for task in tasks:
            path = results_dir / f"{task}.txt"
            if not path.is_file():
                res["missing_subtasks"].append(task)
                complete = False
                continue
            res["subtasks"][task] = sub = score_subtask(path)
            sub["type"] = eval_type
            total += sub["score"]
        res[eval_type] = total
        res[f"{eval_type}_complete"] = complete
    if not res["subtasks"]:
        raise FileNotFoundError(f"{results_dir}: none of MME's 14 <subtask>.txt files (e.g. existence.txt)")
    res["other"] = sum(s["other"] for s in res["subtasks"].values())
    res["questions"] = sum(s["questions"] for s in res["subtasks"].values())
    res["unknown_files"] = unknown
    return res


def format_report(res: dict) -> str:
    lines = []
    for eval_type, tasks in EVAL_TYPES.items():
        note = "" if res[f"{eval_type}_complete"] else "  (INCOMPLETE: subtasks missing)"
        lines.append(f"== {eval_type}: {res[eval_type]:.2f}{note}")
        lines.append(f"   {'subtask':<22} {'n':>4} {'acc':>7} {'acc+':>7} {'score':>7} {'other':>5}")
        for task in tasks:
            s = res["subtasks"].get(task)
            if s is None:
                lines.append(f"   {task:<22}    - missing")
            else:
                lines.append(f"   {task:<22} {s['questions']:>4} {s['accuracy']:7.2f} {s['accuracy_plus']:7.2f} "
                             f"{s['score']:7.2f} {s['other']:>5}")
    lines.append(f"{res['questions']} questions scored; {res['other']} answers neither yes nor no (counted wrong)")
    if res["missing_subtasks"]:
        lines.append(f"WARNING missing subtask files: {', '.join(res['missing_subtasks'])}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score MME eval_tool files (perception / cognition sums).")
    parser.add_argument("--results_dir", "--results-dir", dest="results_dir", type=Path, required=True,
                        help="folder of <subtask>.txt files (convert_answer_to_mme's --output-dir)")
    parser.add_argument("--output-result", type=Path, help="write the figures as JSON")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of the text report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = score(args.results_dir)
    if args.output_result:
        write_json(args.output_result, res)
    print(json.dumps(res, indent=2) if args.json else format_report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
