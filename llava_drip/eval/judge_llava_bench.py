"""LLaVA-Bench-in-the-Wild LLM judge over any OpenAI-compatible chat endpoint.

Same protocol and flags as LLaVA's ``llava/eval/eval_gpt_review_bench.py`` (also available under
that name, ``llava_drip/eval/eval_gpt_review_bench.py``), so its scripts, ``rule.json`` and
review files keep working: per question the judge sees the image caption (context.jsonl), the
question, the reference answer as assistant 1 and ours as assistant 2, and the category's prompt
from the rule file; the first line of its reply holds the two scores. The judge model defaults to
LLaVA's ``gpt-4-0314`` (``--model`` or ``$JUDGE_MODEL`` to change it); the openai client reads
the key from ``$OPENAI_API_KEY`` and the endpoint from ``$OPENAI_BASE_URL``.

Differences, on purpose: answers are joined to questions by ``question_id`` (LLaVA zips lines),
requests are retried with backoff and cached on disk (a rerun sends nothing it already has), and
a reply without two scores from 1 to 10 on its first line (NaN, inf, 0 or 11 included) is written
with ``tuple: null``, left out of the summary and counted there (``--llava-compat`` writes
``[-1, -1]`` as LLaVA does, for LLaVA's own summarizer; ours leaves those out too). A reply with no
text (no choices, no message, empty content) is retried like a failed request, then taken as
unparsable and not cached, so a rerun asks again.

    OPENAI_API_KEY=... python llava_drip/eval/eval_gpt_review_bench.py --question questions.jsonl \
        --context context.jsonl --rule llava_drip/eval/table/rule.json \
        --answer-list answers_gpt4.jsonl ours.jsonl --output reviews/ours.jsonl
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from tqdm import tqdm

if not __package__:  # run as a file (python llava_drip/eval/X.py): import this checkout's package
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from llava_drip.eval.io_utils import iter_jsonl, join_answers, read_json, read_jsonl_by_id, write_jsonl
from llava_drip.eval.summarize_gpt_review import SCORE_RANGES, format_table, summarize, usable_pair

logger = logging.getLogger(__name__)

# Our own judge prompt, in LLaVA's rule.json schema and at its place (llava/eval/table/rule.json).
DEFAULT_RULE = Path(__file__).resolve().parent / "table" / "rule.json"
# The judge LLaVA's eval_gpt_review_bench.py hard-codes; $JUDGE_MODEL or --model replace it.
DEFAULT_JUDGE_MODEL = "gpt-4-0314"
# LLaVA's system message, kept word for word so scores stay comparable with its reviews.
SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
_RETRYABLE = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)


def build_content(caption: str, question: str, answer1: str, answer2: str, rule: dict) -> str:
    """The user message: LLaVA's layout (context, question, both answers, then the rule prompt)."""
    role = rule["role"]
    return (f"[Context]\n{caption}\n\n[Question]\n{question}\n\n"
            f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n"
            f"[System]\n{rule['prompt']}\n\n")


def parse_scores(review: str, score_range: tuple[float, float] = SCORE_RANGES["judge"]) -> list[float] | None:
    """Two scores from the first line ("8 9" or "8, 9"), else None.

    LLaVA splits on single spaces, so "8  9" fails there; here any whitespace separates. Scores
    must be finite and inside ``score_range`` (the prompts ask for 1 to 10): float() also reads
    "nan", "inf" and "1e308", which would poison every mean, so those are unparsable as well.
    """
    first = review.strip().split("\n")[0] if isinstance(review, str) else ""
    parts = first.replace(",", " ").split()
    if len(parts) != 2:
        return None
    try:
        pair = [float(parts[0]), float(parts[1])]
    except ValueError:
        return None
    low, high = score_range
    return pair if all(math.isfinite(x) and low <= x <= high for x in pair) else None


def reply_text(resp) -> str:
    """The reply's text, or "" when the response has none (no choices, no message, null content).

    OpenAI-compatible servers do send such bodies (content filters, overloaded backends); the
    client does not validate them, so every step is looked up defensively.
    """
    choices = getattr(resp, "choices", None)
    if not choices or not isinstance(choices, list):
        return ""
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    return content if isinstance(content, str) else ""


class JudgeCache:
    """Append-only JSONL of ``{key, content}``: a reply is paid for once, even across crashes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._replies: dict[str, str] = {}
        if path.exists():
            for lineno, row in iter_jsonl(path):
                if "key" not in row or "content" not in row:
                    raise ValueError(f"{path}:{lineno}: cache line needs 'key' and 'content'")
                self._replies[row["key"]] = row["content"]

    def get(self, key: str) -> str | None:
        return self._replies.get(key)

    def put(self, key: str, content: str) -> None:
        with self._lock:
            self._replies[key] = content
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "content": content}, ensure_ascii=False) + "\n")


class Judge:
    """One chat model behind an OpenAI-compatible endpoint, with retries and a cache."""

    def __init__(self, client: openai.OpenAI, model: str, cache: JudgeCache, base_url: str = "",
                 temperature: float = 0.2, max_tokens: int = 1024, max_retries: int = 5,
                 retry_wait: float = 2.0) -> None:
        self.client, self.model, self.cache = client, model, cache
        self.base_url, self.temperature, self.max_tokens = base_url, temperature, max_tokens
        self.max_retries, self.retry_wait = max_retries, retry_wait
        self.num_requests = 0  # HTTP requests sent, retries included
        self._count_lock = threading.Lock()

    def _key(self, content: str) -> str:
        blob = json.dumps([self.base_url, self.model, self.temperature, self.max_tokens, SYSTEM_PROMPT, content])
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def review(self, content: str) -> str:
        """The judge's reply to one user message (from the cache when already asked)."""
        key = self._key(content)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]
        for attempt in range(self.max_retries + 1):
            try:
                with self._count_lock:
                    self.num_requests += 1
                resp = self.client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens)
            except _RETRYABLE as e:
                if attempt == self.max_retries:
                    raise RuntimeError(f"judge request failed {attempt + 1} times, last: {type(e).__name__}: {e}") from e
                problem = f"judge request failed ({type(e).__name__})"
            else:
                reply = reply_text(resp)
                if reply.strip():
                    self.cache.put(key, reply)
                    return reply
                if attempt == self.max_retries:
                    # Not cached: an empty reply is no answer, so a rerun asks again.
                    logger.warning("judge reply without text %d times; taken as unparsable", attempt + 1)
                    return ""
                problem = "judge reply without text (no choices, no message or empty content)"
            wait = self.retry_wait * 2 ** attempt
            logger.warning("%s, retry %d/%d in %.1f s", problem, attempt + 1, self.max_retries, wait)
            time.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")


def load_rules(path: Path) -> dict[str, dict]:
    rules = read_json(path)
    for name, rule in rules.items():
        if not isinstance(rule, dict) or "role" not in rule or "prompt" not in rule:
            raise ValueError(f"{path}: rule {name!r} needs 'role' and 'prompt'")
    return rules


def judge_all(judge: Judge, question_path: Path, context_path: Path, ref_path: Path, answer_path: Path,
              rules: dict[str, dict], llava_compat: bool = False, parallel: int = 1) -> list[dict]:
    """Review lines for every question, in question-file order."""
    contexts = read_jsonl_by_id(context_path, "image")
    jobs = []
    for idx, (q, (ref, ans)) in enumerate(join_answers(question_path, [ref_path, answer_path])):
        if str(q.get("image")) not in contexts:
            raise ValueError(f"{context_path}: no caption for image {q.get('image')!r} of question_id {q['question_id']!r}")
        category = f"llava_bench_{q['category']}"
        if category not in rules:
            raise KeyError(f"no rule {category!r} for question_id {q['question_id']!r}; rules: {sorted(rules)}")
        caption = contexts[str(q["image"])]["caption"]
        if isinstance(caption, list):  # LLaVA joins caption lists by lines (a string is used as it is)
            caption = "\n".join(caption)
        content = build_content(caption, q["text"], ref["text"], ans["text"], rules[category])
        row = {"id": idx + 1, "question_id": q["question_id"],
               "answer1_id": ref.get("answer_id", ref["question_id"]),
               "answer2_id": ans.get("answer_id", ans["question_id"]), "category": category}
        jobs.append((row, content))
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        replies = list(tqdm(pool.map(judge.review, [c for _, c in jobs]), total=len(jobs), desc="judge"))
    reviews = []
    for (row, _), reply in zip(jobs, replies):
        scores = parse_scores(reply)
        if scores is None:
            scores = [-1.0, -1.0] if llava_compat else None
        reviews.append({**row, "content": reply, "tuple": scores, "scorer": "judge", "judge_model": judge.model})
    return reviews


def _path(text: str) -> Path:
    return Path(os.path.expanduser(text))  # LLaVA expands ~ in every path


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """LLaVA's eval_gpt_review_bench flags (-q -c -a -r -o --max-tokens), then ours."""
    parser = argparse.ArgumentParser(prog=prog, description="LLaVA-Bench LLM judge over an OpenAI-compatible endpoint.")
    parser.add_argument("-q", "--question", type=_path, required=True, help="questions.jsonl")
    parser.add_argument("-c", "--context", type=_path, required=True, help="context.jsonl (image captions)")
    parser.add_argument("-a", "--answer-list", nargs="+", type=_path, required=True, metavar="FILE",
                        help="two files: the reference answers (answers_gpt4.jsonl), then the answers to judge")
    parser.add_argument("-r", "--rule", type=_path, default=DEFAULT_RULE,
                        help="judge prompts in LLaVA's rule.json schema (LLaVA's own rule.json works); "
                             "default: our llava_drip/eval/table/rule.json")
    parser.add_argument("-o", "--output", type=_path, required=True, help="review JSONL to write")
    parser.add_argument("--max-tokens", type=int, default=1024, help="maximum number of tokens of a judge reply")
    parser.add_argument("--model", default=os.environ.get("JUDGE_MODEL") or DEFAULT_JUDGE_MODEL,
                        help=f"judge model as the endpoint names it (default $JUDGE_MODEL, else LLaVA's {DEFAULT_JUDGE_MODEL})")
    parser.add_argument("--base-url", default=None,
                        help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (default: $OPENAI_BASE_URL, "
                             "else OpenAI, as the openai client does)")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--max-retries", type=int, default=5, help="retries on connection errors, 429 and 5xx")
    parser.add_argument("--retry-wait", type=float, default=2.0, help="first backoff in seconds, doubled each retry")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--parallel", type=int, default=1, help="concurrent requests")
    parser.add_argument("--cache", type=_path, help="reply cache (default: OUTPUT.cache, JSONL)")
    parser.add_argument("--llava-compat", action="store_true", help="score unparsable replies [-1, -1] as LLaVA does")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO; keep the console to our own messages.
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if len(args.answer_list) != 2:
        parser.error(f"--answer-list takes two files (reference answers, then the answers to judge), "
                     f"got {len(args.answer_list)}")
    if not args.rule.exists():
        parser.error(f"rule file {args.rule} not found; pass --rule (LLaVA's rule.json or ours, {DEFAULT_RULE})")
    api_key = os.environ.get(args.api_key_env)
    if not api_key:
        parser.error(f"set ${args.api_key_env} to the endpoint's API key (any non-empty value if it checks none)")
    # Retries are ours (logged, with backoff); the client's own would hide them.
    client = openai.OpenAI(base_url=args.base_url, api_key=api_key, max_retries=0, timeout=args.timeout)
    cache = JudgeCache(args.cache or args.output.with_name(args.output.name + ".cache"))
    # the endpoint is part of the cache key: the one the client resolved, from --base-url or $OPENAI_BASE_URL
    judge = Judge(client, args.model, cache, base_url=str(client.base_url), temperature=args.temperature,
                  max_tokens=args.max_tokens, max_retries=args.max_retries, retry_wait=args.retry_wait)
    reviews = judge_all(judge, args.question, args.context, *args.answer_list, load_rules(args.rule),
                        llava_compat=args.llava_compat, parallel=args.parallel)
    write_jsonl(args.output, reviews)

    bad = [r["question_id"] for r in reviews if usable_pair(r["tuple"], "judge") is None]
    print(f"wrote {len(reviews)} reviews to {args.output} ({judge.num_requests} requests, "
          f"{len(reviews) - len(bad)} parsed)")
    if bad:
        fate = ("written [-1, -1] (--llava-compat; LLaVA's summarizer averages them in, ours leaves them out)"
                if args.llava_compat else "excluded from the summary")
        print(f"{len(bad)} of {len(reviews)} judge replies unusable (no two scores from 1 to 10 on the first "
              f"line), {fate}: question_id {bad}")
    if len(bad) == len(reviews):
        print("no usable judge reply: no score")
        return 1
    print(format_table(summarize([args.output])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
