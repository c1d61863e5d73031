"""Offline, rule-based LLaVA-Bench scorer: each answer against the reference (GPT-4) answer.

No judge model, so it runs anywhere and is deterministic; it measures overlap with the reference
answer, not quality, so use it for regressions and ablations, not to compare with published
judge scores. Measures, each in [0, 1] and 1 for the reference against itself:

- ``rougeL_f``: ROUGE-L F-measure from Google's ``rouge-score`` package (Porter stemming).
- ``token_f1``: F1 of the bags of tokens (SQuAD-style), with rouge-score's tokenizer and stemming.
- ``keyword_recall``: share of the reference's distinct content words (stopwords removed,
  stemmed) that the answer contains.

The review score is their mean. Review lines follow the judge's schema (``tuple`` = [10, 10 x
score], reference first), so ``summarize_gpt_review`` reads both and the reference scores 100.

    python -m llava_drip.eval.rule_scorer --question Q --answer-list REF OURS --output REVIEWS
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

from rouge_score import rouge_scorer, tokenizers

if not __package__:  # run as a file (python llava_drip/eval/X.py): import this checkout's package
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from llava_drip.eval.io_utils import join_answers, write_jsonl

logger = logging.getLogger(__name__)

MEASURES = ("rougeL_f", "token_f1", "keyword_recall")

# English function words, written for this scorer (no NLTK corpus download offline). Contraction
# pieces ("s", "t", "ll") are listed because the tokenizer splits "it's" into "it" and "s".
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had
has have having he her here hers herself him himself his how i if in into is it its itself just
me more most my myself no nor not now of off on once only or other our ours ourselves out over
own same she should so some such than that the their theirs them themselves then there these
they this those through to too under until up very was we were what when where which while who
whom why will with would you your yours yourself yourselves may might must shall s t d ll m re ve
""".split())


class RuleScorer:
    """Overlap measures between a reference answer and a candidate answer."""

    def __init__(self) -> None:
        self._plain = tokenizers.DefaultTokenizer(use_stemmer=False)
        self._stemming = tokenizers.DefaultTokenizer(use_stemmer=True)
        # Same as use_stemmer=True; passing the tokenizer skips rouge-score's INFO log line.
        self._rouge = rouge_scorer.RougeScorer(["rougeL"], tokenizer=self._stemming)
        self._stems: dict[str, str] = {}

    def _stem(self, word: str) -> str:
        # Stem through rouge-score's tokenizer so every measure uses the same stemming rule.
        if word not in self._stems:
            out = self._stemming.tokenize(word)
            self._stems[word] = out[0] if out else word
        return self._stems[word]

    def tokens(self, text: str) -> list[str]:
        """Lower-cased alphanumeric tokens, stemmed as ROUGE does."""
        return [self._stem(t) for t in self._plain.tokenize(text)]

    def keywords(self, text: str) -> set[str]:
        """Distinct stemmed content words."""
        return {self._stem(t) for t in self._plain.tokenize(text) if t not in STOPWORDS}

    def measures(self, reference: str, answer: str) -> dict[str, float]:
        ref_tok, ans_tok = self.tokens(reference), self.tokens(answer)
        if not ref_tok or not ans_tok:
            # rouge-score gives 0 for empty text; two empty texts do agree.
            same = float(not ref_tok and not ans_tok)
            return {m: same for m in MEASURES}
        overlap = sum((Counter(ref_tok) & Counter(ans_tok)).values())
        token_f1 = 2 * overlap / (len(ref_tok) + len(ans_tok))
        ref_kw = self.keywords(reference)
        # A reference with no content words leaves nothing to miss.
        keyword_recall = len(ref_kw & set(ans_tok)) / len(ref_kw) if ref_kw else 1.0
        rouge_l = self._rouge.score(reference, answer)["rougeL"].fmeasure
        return {"rougeL_f": rouge_l, "token_f1": token_f1, "keyword_recall": keyword_recall}


def score_answers(question_path: str | Path, ref_path: str | Path, answer_path: str | Path) -> list[dict]:
    """Review lines (judge schema plus ``measures``) for every question, joined by question_id."""
    scorer = RuleScorer()
    reviews = []
    for idx, (q, (ref, ans)) in enumerate(join_answers(question_path, [ref_path, answer_path])):
        m = scorer.measures(ref["text"], ans["text"])
        score = sum(m.values()) / len(m)
        reviews.append({
            "id": idx + 1,
            "question_id": q["question_id"],
            "answer1_id": ref.get("answer_id", ref["question_id"]),
            "answer2_id": ans.get("answer_id", ans["question_id"]),
            "category": f"llava_bench_{q['category']}",
            "content": f"10 {10 * score:.4f}\n" + ", ".join(f"{k} {v:.4f}" for k, v in m.items()),
            "tuple": [10.0, 10.0 * score],
            "scorer": "rule",
            "measures": m,
        })
    return reviews


def format_measures(reviews: list[dict]) -> str:
    """Mean of each measure x100 per category, with 'all' first."""
    groups: dict[str, list[dict]] = {"all": [r["measures"] for r in reviews]}
    for r in reviews:
        groups.setdefault(r["category"].removeprefix("llava_bench_"), []).append(r["measures"])
    lines = [f"{'category':<10}{'n':>4}" + "".join(f"{m:>16}" for m in (*MEASURES, "score"))]
    for cat, ms in groups.items():
        means = [100 * sum(x[m] for x in ms) / len(ms) for m in MEASURES]
        lines.append(f"{cat:<10}{len(ms):>4}" + "".join(f"{v:>16.1f}" for v in (*means, sum(means) / len(means))))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rule-based LLaVA-Bench scorer (ROUGE-L F, token F1, keyword recall).")
    parser.add_argument("--question", type=Path, required=True, help="questions.jsonl (question_id, category, text)")
    parser.add_argument("--answer-list", nargs=2, type=Path, required=True, metavar=("REFERENCE", "ANSWERS"),
                        help="reference answers (answers_gpt4.jsonl), then the answers to score")
    parser.add_argument("--output", type=Path, required=True, help="review JSONL to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    reviews = score_answers(args.question, *args.answer_list)
    write_jsonl(args.output, reviews)
    print(format_measures(reviews))
    print(f"wrote {len(reviews)} reviews to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
