"""Relative scores from LLaVA-Bench review files (LLM judge or rule-based), LLaVA's summary rules.

As in LLaVA's ``llava/eval/summarize_gpt_review.py``: each review line carries a category and a
``tuple`` (or ``score``) of two scores, reference answer first; per category the two scores are
averaged over lines, and the relative score is ``mean(model) / mean(reference) * 100``; ``all``
pools every line. Lines whose tuple is null (judge output that could not be parsed, written by
``judge_llava_bench`` without ``--llava-compat``) are excluded and counted. ``[-1, -1]`` tuples
(LLaVA's own parse-failure value) are averaged in, exactly as LLaVA does.

With several files (repeated judge runs), each run is printed and then the mean of the runs'
relative scores, per scorer.

    python -m llava_drip.eval.summarize_gpt_review -f REVIEWS... [--json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava_drip.eval.io_utils import iter_jsonl

# Table columns: key in the summary, header as in LLaVA-Bench tables.
COLUMNS = (("all", "Average"), ("conv", "Conversation"), ("detail", "Detail"), ("complex", "Reasoning"))
_CATEGORY_PREFIX = "llava_bench_"


def summarize_file(path: str | Path, ignore: set[str] = frozenset()) -> dict:
    """Scores of one review file.

    Returns:
        ``{"file", "scorer", "all", "conv", "detail", "complex", ..., "reference", "model",
        "count", "excluded"}``: relative scores per category at the top level (any extra
        category too), ``reference``/``model`` the mean raw scores x 10 as LLaVA prints them.
    """
    tuples: dict[str, list[tuple[float, float]]] = {"all": []}
    scorers: set[str] = set()
    excluded = 0
    for lineno, review in iter_jsonl(path):
        if "question_id" in review and str(review["question_id"]) in ignore:
            continue
        pair = review["tuple"] if "tuple" in review else review.get("score", "missing")
        if pair == "missing":
            raise ValueError(f"{path}:{lineno}: review has neither 'tuple' nor 'score'")
        if pair is None:
            excluded += 1
            continue
        if len(pair) != 2:
            raise ValueError(f"{path}:{lineno}: expected two scores, got {pair!r}")
        pair = (float(pair[0]), float(pair[1]))
        # LLaVA's own review files have no 'scorer' field: they come from the GPT judge.
        scorers.add(review.get("scorer", "judge"))
        tuples["all"].append(pair)
        if "category" in review:
            tuples.setdefault(review["category"].removeprefix(_CATEGORY_PREFIX), []).append(pair)
    if not tuples["all"]:
        raise ValueError(f"{path}: no usable review lines ({excluded} excluded)")
    if len(scorers) > 1:
        raise ValueError(f"{path}: reviews from several scorers {sorted(scorers)} in one file")
    out: dict = {"file": str(path), "scorer": scorers.pop()}
    reference, model = {}, {}
    for cat, pairs in tuples.items():
        ref_mean = sum(p[0] for p in pairs) / len(pairs)
        model_mean = sum(p[1] for p in pairs) / len(pairs)
        out[cat] = model_mean / ref_mean * 100 if ref_mean else None
        reference[cat], model[cat] = ref_mean * 10, model_mean * 10
    out.update(reference=reference, model=model, count=len(tuples["all"]), excluded=excluded)
    return out


def mean_of_runs(runs: list[dict]) -> dict:
    """Mean relative score per category over runs (runs lacking a category are skipped for it)."""
    cats = [c for c, _ in COLUMNS] + sorted({k for r in runs for k in r["reference"]} - {c for c, _ in COLUMNS})
    mean = {}
    for cat in cats:
        vals = [r[cat] for r in runs if r.get(cat) is not None]
        mean[cat] = sum(vals) / len(vals) if vals else None
    return mean


def summarize(paths: list[str | Path], ignore: set[str] = frozenset()) -> dict:
    """``{"runs": [...], "mean": {...}, "mean_by_scorer": {scorer: {...}}}``.

    ``mean`` averages all runs when they come from one scorer; with judge and rule-based files
    mixed it is None, because averaging the two scales means nothing.
    """
    runs = [summarize_file(p, ignore) for p in paths]
    by_scorer: dict[str, list[dict]] = {}
    for r in runs:
        by_scorer.setdefault(r["scorer"], []).append(r)
    return {
        "runs": runs,
        "mean": mean_of_runs(runs) if len(by_scorer) == 1 else None,
        "mean_by_scorer": {s: mean_of_runs(rs) for s, rs in by_scorer.items()},
    }


def _cell(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def format_table(summary: dict) -> str:
    """Rows (run, scorer, Average, Conversation, Detail, Reasoning), then each scorer's mean."""
    rows = [("run", "scorer", *(h for _, h in COLUMNS), "lines", "excluded")]
    for r in summary["runs"]:
        rows.append((Path(r["file"]).name, r["scorer"], *(_cell(r.get(c)) for c, _ in COLUMNS),
                     str(r["count"]), str(r["excluded"])))
    for scorer, mean in summary["mean_by_scorer"].items():
        num = sum(r["scorer"] == scorer for r in summary["runs"])
        if num > 1:
            rows.append((f"mean of {num} runs", scorer, *(_cell(mean.get(c)) for c, _ in COLUMNS), "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    detail = ["", "per run, absolute scores x10 (reference -> model):"]
    for r in summary["runs"]:
        cells = [f"{c} {r['reference'][c]:.1f} -> {r['model'][c]:.1f}" for c in r["reference"]]
        detail.append(f"  {Path(r['file']).name}: " + "; ".join(cells))
    return "\n".join(lines + detail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Relative scores from LLaVA-Bench review files.")
    parser.add_argument("-f", "--files", nargs="+", type=Path, default=[], help="review JSONL files (one per run)")
    parser.add_argument("-d", "--dir", type=Path, help="also read every review*.jsonl in this folder (sorted)")
    parser.add_argument("-i", "--ignore", nargs="*", default=[], help="question ids to leave out")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    paths = list(args.files) + (sorted(args.dir.glob("review*.jsonl")) if args.dir else [])
    if not paths:
        parser.error("no review files: give -f FILES or -d DIR")
    summary = summarize(paths, set(args.ignore))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
