"""Relative scores from LLaVA-Bench review files (LLM judge or rule-based), LLaVA's summary rules.

As in LLaVA's ``llava/eval/summarize_gpt_review.py`` (same flags: ``-d -v -s -f -i``): each
review line carries a category and a ``tuple`` (or ``score``) of two scores, reference answer
first; per category the two scores are averaged over lines, and the relative score is
``mean(model) / mean(reference) * 100``; ``all`` pools every line.

Two figures per run and category:

- ``llava``: the number LLaVA prints, computed its way: both means rounded to 3 decimals, then
  the ratio rounded to 0.1. LLaVA's published LLaVA-Bench scores are the mean of these printed
  per-run figures over its judge runs (LLaVA-1.5-13B: 72.8, 72.7, 72.1 -> 72.5).
- the unrounded relative score (top-level keys ``all``, ``conv``, ...).

With several files the summary gives, per scorer, the mean of the runs' LLaVA figures (``mean``,
the published convention) and, beside it, the mean of the unrounded scores (``mean_unrounded``).

Unusable lines are left out of every figure and counted (``excluded``, the ``unusable`` column):
a null tuple (a judge reply ``judge_llava_bench`` could not parse), and any pair that is not two
finite numbers inside the scorer's scale (``SCORE_RANGES``: the judge's 1-10, the rule scorer's
0-10). That includes ``[-1, -1]``, LLaVA's parse-failure value, which LLaVA averages in: a review
file holding such lines gets a different (unbiased) figure here than LLaVA prints for it.

    python llava_drip/eval/summarize_gpt_review.py -f REVIEWS... [--json]
    python -m llava_drip.eval.summarize_gpt_review -d reviews/NAME [-s eval] [-v 0613]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

if not __package__:  # run as a file (python llava_drip/eval/X.py): import this checkout's package
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from llava_drip.eval.io_utils import iter_jsonl

# Table columns: key in the summary, header as in LLaVA-Bench tables.
COLUMNS = (("all", "Average"), ("conv", "Conversation"), ("detail", "Detail"), ("complex", "Reasoning"))
_CATEGORY_PREFIX = "llava_bench_"
# LLaVA's -d picks .jsonl files with these prefixes, or every .jsonl when the folder's path says "review".
_REVIEW_PREFIXES = ("gpt4_text", "reviews_", "review_")
# Inclusive scale of each scorer's scores. The judge prompts (LLaVA's and ours) ask for 1 to 10,
# so a 0, a -1 or an 11 is a judge error, not a score; the rule scorer's 10 x mean of [0, 1]
# measures can be 0. Lines without a scorer field are LLaVA's, from the judge.
SCORE_RANGES = {"judge": (1.0, 10.0), "rule": (0.0, 10.0)}


def usable_pair(pair, scorer: str = "judge") -> tuple[float, float] | None:
    """``pair`` as two floats when both are finite numbers on ``scorer``'s scale, else None.

    NaN would turn every mean into nan and inf or 1e308 would swamp it, so they count as unusable
    like an unparsable reply. Strings and booleans are not scores either.
    """
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        return None
    low, high = SCORE_RANGES.get(scorer, SCORE_RANGES["judge"])
    out = []
    for x in pair:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return None
        x = float(x)
        if not (math.isfinite(x) and low <= x <= high):
            return None
        out.append(x)
    return out[0], out[1]


def llava_relative(pairs: list[tuple[float, float]]) -> tuple[float | None, float, float]:
    """``(relative, reference x10, model x10)`` exactly as LLaVA prints them.

    LLaVA averages with numpy, rounds both means to 3 decimals, and prints
    ``round(model / reference * 100, 1)`` and each mean x10 rounded to 0.1.
    """
    ref, model = (round(x, 3) for x in np.asarray(pairs, dtype=np.float64).mean(0).tolist())
    rel = round(model / ref * 100, 1) if ref else None
    return rel, round(ref * 10, 1), round(model * 10, 1)


def run_name(path: str | Path) -> str:
    """LLaVA's label of a review file: its name without ``gpt4_text_`` and ``.jsonl``."""
    return os.path.basename(str(path)).replace("gpt4_text_", "").replace(".jsonl", "")


def judge_version(name: str) -> str:
    """LLaVA's ``-v`` key: ``0613`` when the run's name says so, else ``0314`` (its GPT-4 snapshots)."""
    return "0613" if "0613" in name else "0314"


def summarize_file(path: str | Path, ignore: set[str] = frozenset()) -> dict:
    """Scores of one review file.

    Returns:
        ``{"file", "name", "scorer", "all", "conv", "detail", "complex", ..., "llava",
        "reference", "model", "count", "excluded"}``: unrounded relative scores per category at
        the top level (any extra category too); ``llava`` the same as LLaVA prints them (0.1);
        ``reference``/``model`` the mean raw scores x 10 (unrounded); ``count`` the usable lines,
        ``excluded`` the unusable ones (null tuple, or not two finite scores on the scale).
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
        if pair is not None and (not isinstance(pair, (list, tuple)) or len(pair) != 2):
            raise ValueError(f"{path}:{lineno}: expected two scores, got {pair!r}")
        # LLaVA's own review files have no 'scorer' field: they come from the GPT judge.
        scorer = review.get("scorer", "judge")
        scorers.add(scorer)
        pair = usable_pair(pair, scorer) if pair is not None else None
        if pair is None:
            excluded += 1
            continue
        tuples["all"].append(pair)
        if "category" in review:
            tuples.setdefault(review["category"].removeprefix(_CATEGORY_PREFIX), []).append(pair)
    if not tuples["all"]:
        raise ValueError(f"{path}: no usable review lines ({excluded} unusable: null, or not two "
                         f"finite scores on the scorer's scale)")
    if len(scorers) > 1:
        raise ValueError(f"{path}: reviews from several scorers {sorted(scorers)} in one file")
    out: dict = {"file": str(path), "name": run_name(path), "scorer": scorers.pop()}
    llava, reference, model = {}, {}, {}
    for cat, pairs in tuples.items():
        ref_mean = sum(p[0] for p in pairs) / len(pairs)
        model_mean = sum(p[1] for p in pairs) / len(pairs)
        out[cat] = model_mean / ref_mean * 100 if ref_mean else None
        llava[cat] = llava_relative(pairs)[0]
        reference[cat], model[cat] = ref_mean * 10, model_mean * 10
    out.update(llava=llava, reference=reference, model=model, count=len(tuples["all"]), excluded=excluded)
    return out


def _categories(runs: list[dict]) -> list[str]:
    extra = sorted({k for r in runs for k in r["reference"]} - {c for c, _ in COLUMNS})
    return [c for c, _ in COLUMNS] + extra


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def mean_of_runs(runs: list[dict]) -> dict:
    """``{"mean": {cat: ...}, "mean_unrounded": {cat: ...}, "runs": n}`` over runs of one scorer.

    ``mean`` averages the runs' LLaVA figures (LLaVA's published convention); ``mean_unrounded``
    the unrounded relative scores. Runs lacking a category are skipped for it.
    """
    cats = _categories(runs)
    return {"mean": {c: _mean([r["llava"].get(c) for r in runs]) for c in cats},
            "mean_unrounded": {c: _mean([r.get(c) for r in runs]) for c in cats},
            "runs": len(runs)}


def summarize(paths: list[str | Path], ignore: set[str] = frozenset()) -> dict:
    """``{"runs": [...], "mean", "mean_unrounded", "by_scorer": {scorer: mean_of_runs(...)}}``.

    ``mean`` and ``mean_unrounded`` cover all runs when they come from one scorer; with judge and
    rule-based files mixed they are None, because averaging the two scales means nothing.
    """
    runs = [summarize_file(p, ignore) for p in paths]
    by_scorer: dict[str, list[dict]] = {}
    for r in runs:
        by_scorer.setdefault(r["scorer"], []).append(r)
    means = {s: mean_of_runs(rs) for s, rs in by_scorer.items()}
    single = next(iter(means.values())) if len(means) == 1 else None
    return {
        "runs": runs,
        "mean": single["mean"] if single else None,
        "mean_unrounded": single["mean_unrounded"] if single else None,
        "by_scorer": means,
    }


def select_files(files: list[str], folder: str | None, version: str | None = None,
                 select: list[str] | None = None) -> list[str]:
    """Review files as LLaVA's summary picks them, sorted.

    ``files`` (relative to ``folder`` when both are given) or else the review ``.jsonl`` files in
    ``folder``; ``select``: keep runs whose name contains every string; ``version``: keep runs of
    that judge snapshot (``judge_version``).
    """
    if files:
        names = list(files)
    elif folder is not None:
        names = [x for x in os.listdir(folder)
                 if x.endswith(".jsonl") and (x.startswith(_REVIEW_PREFIXES) or "review" in folder)]
    else:
        raise ValueError("no review files: give -f FILES or -d DIR")
    picked = []
    for name in sorted(names):
        label = run_name(name)
        if select and any(s not in label for s in select):
            continue
        if version is not None and judge_version(label) != version:
            continue
        picked.append(os.path.join(folder, name) if folder is not None else name)
    return picked


def _cell(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def format_table(summary: dict) -> str:
    """Rows (run, scorer, Average, Conversation, Detail, Reasoning) with the figures LLaVA prints,
    then per scorer the mean of the runs and, beside it, the unrounded mean."""
    rows = [("run", "scorer", *(h for _, h in COLUMNS), "lines", "unusable")]
    for r in summary["runs"]:
        rows.append((r["name"], r["scorer"], *(_cell(r["llava"].get(c)) for c, _ in COLUMNS),
                     str(r["count"]), str(r["excluded"])))
    for scorer, m in summary["by_scorer"].items():
        if m["runs"] > 1:
            rows.append((f"mean of {m['runs']} runs", scorer, *(_cell(m["mean"].get(c)) for c, _ in COLUMNS), "", ""))
            rows.append(("  unrounded mean", scorer, *(_cell(m["mean_unrounded"].get(c), 3) for c, _ in COLUMNS), "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    bad = [r for r in summary["runs"] if r["excluded"]]
    if bad:  # said in words too: a figure over fewer lines than asked must not pass unnoticed
        lines.append("")
        for r in bad:
            low, high = SCORE_RANGES.get(r["scorer"], SCORE_RANGES["judge"])
            lines.append(f"{r['name']}: {r['excluded']} of {r['count'] + r['excluded']} reviews unusable "
                         f"(no two finite scores from {low:g} to {high:g}), left out of every figure")
    detail = ["", "per run, unrounded relative score; absolute scores x10 (reference -> model):"]
    for r in summary["runs"]:
        cells = [f"{c} {_cell(r.get(c), 3)}; {r['reference'][c]:.1f} -> {r['model'][c]:.1f}" for c in r["reference"]]
        detail.append(f"  {r['name']}: " + " | ".join(cells))
    return "\n".join(lines + detail)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Relative scores from LLaVA-Bench review files.")
    parser.add_argument("-d", "--dir", default=None,
                        help="folder of review files: every review .jsonl in it, or the -f files relative to it")
    parser.add_argument("-v", "--version", default=None, help="keep runs of one judge snapshot: 0613 or 0314 (from the file name)")
    parser.add_argument("-s", "--select", nargs="*", default=None, help="keep runs whose file name contains every string")
    parser.add_argument("-f", "--files", nargs="*", default=[], help="review JSONL files (one per run)")
    parser.add_argument("-i", "--ignore", nargs="*", default=[], help="question ids to leave out")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.files and args.dir is None:
        parser.error("no review files: give -f FILES or -d DIR")
    paths = select_files(args.files, args.dir, args.version, args.select)
    if not paths:
        parser.error("no review file left after -s/-v")
    summary = summarize(paths, set(args.ignore))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
