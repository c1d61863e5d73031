"""LLaVA-Bench-in-the-Wild: summary rules, rule-based scorer, and the LLM judge end to end.

The summary must reproduce LLaVA-1.5-13B's published 72.5 from its three published review runs.
The judge talks HTTP to a small OpenAI-compatible server started here on 127.0.0.1. Real data
comes from $LLAVA_DRIP_DATA (conftest.py's shared_data); tests that need it skip without it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llava_drip.eval import judge_llava_bench, rule_scorer, summarize_gpt_review
from llava_drip.eval.judge_llava_bench import parse_scores
from llava_drip.eval.summarize_gpt_review import SCORE_RANGES

API_KEY = "sk-test-not-a-real-key-5f3a9c"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(shared_data: Path) -> Path:
    path = shared_data / "llava_bench" / "in_the_wild"
    if not (path / "questions.jsonl").is_file():
        pytest.skip(f"{path} has no questions.jsonl")
    return path


def run_module(module: str, *args, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def run_script(script: str, *args, env: dict | None = None) -> str:
    """``python llava_drip/eval/X.py ...`` from the repository root, as LLaVA's scripts call theirs."""
    proc = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- summary


def test_summary_reproduces_published_llava_15_13b(bench):
    ref = bench / "llava_v1.5_13b_reference"
    files = [ref / f"reviews_llava-v1.5-13b-eval{i}.jsonl" for i in (1, 2, 3)]
    summary = json.loads(run_module("llava_drip.eval.summarize_gpt_review", "-f", *files, "--json"))
    runs = summary["runs"]
    assert [r["file"] for r in runs] == [str(f) for f in files]
    # LLaVA's printed per-run figures (3-decimal means, then 0.1), and their mean: the published 72.5
    assert [r["llava"]["all"] for r in runs] == [72.8, 72.7, 72.1]
    assert summary["mean"]["all"] == pytest.approx((72.8 + 72.7 + 72.1) / 3) and f"{summary['mean']['all']:.1f}" == "72.5"
    assert summary["mean_unrounded"]["all"] == pytest.approx(72.547, abs=1e-3)
    assert [runs[0]["llava"][c] for c in ("conv", "detail", "complex")] == [74.7, 52.6, 82.8]
    # LLaVA rounds the means first: its 52.6 for detail, where the unrounded 52.65 would give 52.7
    assert runs[0]["detail"] == pytest.approx(52.652, abs=1e-3)
    assert [round(summary["mean"][c], 1) for c in ("conv", "detail", "complex")] == [74.0, 51.6, 83.3]
    assert [round(summary["mean_unrounded"][c], 1) for c in ("conv", "detail", "complex")] == [73.9, 51.6, 83.3]
    assert (round(runs[0]["reference"]["all"], 1), round(runs[0]["model"]["all"], 1)) == (86.5, 63.0)

    # as LLaVA's scripts call it: a plain script, -d picking the review files of the folder
    text = run_script("llava_drip/eval/summarize_gpt_review.py", "-d", ref)
    assert "Average  Conversation  Detail  Reasoning" in text
    mean_row = next(line for line in text.splitlines() if line.startswith("mean of 3 runs"))
    assert mean_row.split()[-4:] == ["72.5", "74.0", "51.6", "83.3"]
    unrounded_row = next(line for line in text.splitlines() if "unrounded mean" in line)
    assert unrounded_row.split()[-4:] == ["72.547", "73.934", "51.633", "83.333"]


def test_summary_selects_runs_as_llava(bench, tmp_path):
    src = bench / "llava_v1.5_13b_reference" / "reviews_llava-v1.5-13b-eval1.jsonl"
    folder = tmp_path / "runs"
    folder.mkdir()
    names = ["reviews_a-0314-eval1.jsonl", "reviews_a-0613-eval1.jsonl", "reviews_b-0613-eval1.jsonl",
             "gpt4_text_c.jsonl", "notes.jsonl", "reviews_a-0613-eval1.jsonl.cache"]
    for name in names:
        shutil.copy(src, folder / name)
    pick = lambda *a: [Path(p).name for p in summarize_gpt_review.select_files([], str(folder), *a)]
    # a folder without "review" in its path: only review_/reviews_/gpt4_text files
    assert pick() == ["gpt4_text_c.jsonl", "reviews_a-0314-eval1.jsonl", "reviews_a-0613-eval1.jsonl",
                      "reviews_b-0613-eval1.jsonl"]
    assert pick("0613") == ["reviews_a-0613-eval1.jsonl", "reviews_b-0613-eval1.jsonl"]
    assert pick("0314", ["a-"]) == ["reviews_a-0314-eval1.jsonl"]
    assert pick(None, ["a-", "eval1"]) == ["reviews_a-0314-eval1.jsonl", "reviews_a-0613-eval1.jsonl"]
    reviews = tmp_path / "my_reviews"
    shutil.copytree(folder, reviews)
    assert "notes.jsonl" in [Path(p).name for p in summarize_gpt_review.select_files([], str(reviews))]
    # -f with -d: the files are relative to the folder
    assert summarize_gpt_review.select_files(["notes.jsonl"], str(folder)) == [str(folder / "notes.jsonl")]


def test_summary_excludes_null_and_minus_one(tmp_path):
    rows = [{"question_id": 0, "category": "llava_bench_conv", "tuple": [8, 4]},
            {"question_id": 1, "category": "llava_bench_detail", "tuple": None},
            {"question_id": 2, "category": "llava_bench_complex", "tuple": [5, 5]}]
    s = summarize_gpt_review.summarize_file(write_jsonl(tmp_path / "reviews.jsonl", rows))
    assert (s["excluded"], s["count"], s["conv"], s["complex"]) == (1, 2, 50.0, 100.0)
    assert "detail" not in s and s["all"] == pytest.approx(9 / 13 * 100)
    rows[1]["tuple"] = [-1, -1]  # LLaVA's parse-failure value: LLaVA averages it in, we leave it out
    s = summarize_gpt_review.summarize_file(write_jsonl(tmp_path / "reviews.jsonl", rows))
    assert (s["excluded"], s["count"]) == (1, 2) and "detail" not in s and s["all"] == pytest.approx(9 / 13 * 100)


def test_summary_excludes_non_finite_and_out_of_range(tmp_path):
    """Pairs a judge could have written (NaN, inf, 1e308, 0, 11, -3, strings) are unusable, counted, not averaged."""
    bad_pairs = [[float("nan"), 9], [float("inf"), 1], [11, -3], [1e308, 1e308], [0, 5], [-1, -1], ["8", "9"], [True, 9]]
    rows = [{"question_id": 0, "category": "llava_bench_conv", "tuple": [8, 4], "scorer": "judge"}]
    rows += [{"question_id": i + 1, "category": "llava_bench_conv", "tuple": p, "scorer": "judge"}
             for i, p in enumerate(bad_pairs)]
    path = tmp_path / "reviews_bad.jsonl"
    write_jsonl(path, rows)  # json.dumps writes NaN and Infinity, which json.loads reads back
    assert "NaN" in path.read_text() and "Infinity" in path.read_text()
    s = summarize_gpt_review.summarize_file(path)
    assert (s["count"], s["excluded"], s["all"], s["llava"]["all"]) == (1, 8, 50.0, 50.0)
    text = run_module("llava_drip.eval.summarize_gpt_review", "-f", path)
    assert "unusable" in text.splitlines()[0]
    assert "reviews_bad: 8 of 9 reviews unusable (no two finite scores from 1 to 10), left out of every figure" in text
    assert "nan" not in text.lower().replace("unusable", "")
    # the rule scorer's scale starts at 0: a zero answer score is a score there
    rule = [{"question_id": 0, "tuple": [10.0, 0.0], "scorer": "rule"}, {"question_id": 1, "tuple": [10.0, 5.0], "scorer": "rule"},
            {"question_id": 2, "tuple": [10.0, float("nan")], "scorer": "rule"}]
    s = summarize_gpt_review.summarize_file(write_jsonl(tmp_path / "rule.jsonl", rule))
    assert (s["count"], s["excluded"], s["all"]) == (2, 1, 25.0)
    # nothing usable is an error, not a score
    with pytest.raises(ValueError, match=r"no usable review lines \(8 unusable"):
        summarize_gpt_review.summarize_file(write_jsonl(tmp_path / "reviews_none.jsonl", rows[1:]))


def test_summary_bad_line(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text('{"question_id": 0, "tuple": [1, 2]}\n{"question_id": 1, "tuple": [1, 2]\n')
    with pytest.raises(ValueError, match=r"reviews\.jsonl:2: malformed JSON line"):
        summarize_gpt_review.summarize_file(path)
    path.write_text('{"question_id": 0, "content": "8 9"}\n')
    with pytest.raises(ValueError, match=r"reviews\.jsonl:1: review has neither 'tuple' nor 'score'"):
        summarize_gpt_review.summarize_file(path)


# ---------------------------------------------------------------- rule-based scorer


def test_rule_scorer_reference_scores_100(bench, tmp_path):
    out = tmp_path / "reviews_ref.jsonl"
    rule_scorer.main(["--question", str(bench / "questions.jsonl"), "--answer-list",
                      str(bench / "answers_gpt4.jsonl"), str(bench / "answers_gpt4.jsonl"), "--output", str(out)])
    reviews = read_jsonl(out)
    assert len(reviews) == 60 and all(r["tuple"] == [10.0, 10.0] for r in reviews)
    s = summarize_gpt_review.summarize_file(out)
    assert s["scorer"] == "rule"
    assert [s[c] for c in ("all", "conv", "detail", "complex")] == [100.0] * 4


@pytest.mark.parametrize("answers", ["bard_0718.jsonl", "bing_chat_0629.jsonl"])
def test_rule_scorer_deterministic_on_real_answers(bench, tmp_path, answers):
    args = ["--question", bench / "questions.jsonl", "--answer-list", bench / "answers_gpt4.jsonl", bench / answers]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rule_scorer.main([str(x) for x in (*args, "--output", a)])
    # A second process with another hash seed: set/dict order must not leak into scores.
    run_module("llava_drip.eval.rule_scorer", *args, "--output", b, env={"PYTHONHASHSEED": "12345"})
    assert a.read_bytes() == b.read_bytes()
    reviews = read_jsonl(a)
    questions = read_jsonl(bench / "questions.jsonl")
    assert [r["question_id"] for r in reviews] == [q["question_id"] for q in questions]
    assert [r["category"] for r in reviews] == [f"llava_bench_{q['category']}" for q in questions]
    for r in reviews:
        assert set(r["measures"]) == set(rule_scorer.MEASURES)
        assert all(0.0 <= v <= 1.0 for v in r["measures"].values())
        assert r["tuple"][1] == pytest.approx(10 * sum(r["measures"].values()) / 3)
        assert parse_scores(r["content"], SCORE_RANGES["rule"]) == pytest.approx(r["tuple"], abs=1e-4)
    s = summarize_gpt_review.summarize_file(a)
    assert 5.0 < s["all"] < 95.0  # real, partial overlap with the GPT-4 answers


def test_rule_scorer_joins_by_question_id(bench, tmp_path):
    rows = read_jsonl(bench / "bard_0718.jsonl")
    random.Random(0).shuffle(rows)
    shuffled = write_jsonl(tmp_path / "bard_shuffled.jsonl", rows)
    ref = bench / "answers_gpt4.jsonl"
    plain = rule_scorer.score_answers(bench / "questions.jsonl", ref, bench / "bard_0718.jsonl")
    assert rule_scorer.score_answers(bench / "questions.jsonl", ref, shuffled) == plain


def test_rule_scorer_measures_by_hand():
    s = rule_scorer.RuleScorer()
    m = s.measures("The red cars are parked.", "A red car is parked outside.")
    # Stemmed tokens: the red car are park / a red car is park outsid -> 3 shared of 5 and 6.
    assert m["token_f1"] == pytest.approx(2 * 3 / 11)
    assert m["keyword_recall"] == pytest.approx(1.0)  # red, car, park all present
    assert m["rougeL_f"] == pytest.approx(2 * (3 / 5) * (3 / 6) / (3 / 5 + 3 / 6))
    assert s.measures("", "") == {k: 1.0 for k in rule_scorer.MEASURES}
    assert s.measures("A cat.", "") == {k: 0.0 for k in rule_scorer.MEASURES}


def test_answers_missing_a_question(bench, tmp_path):
    rows = read_jsonl(bench / "bard_0718.jsonl")[:-1]
    short = write_jsonl(tmp_path / "short.jsonl", rows)
    with pytest.raises(ValueError, match=r"short\.jsonl: no answer for 1 of 60 questions .* question_id \['59'\]"):
        rule_scorer.score_answers(bench / "questions.jsonl", bench / "answers_gpt4.jsonl", short)


# ---------------------------------------------------------------- LLM judge over HTTP


class FakeJudgeServer:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1.

    Its scores are a function of the two answers it is shown, so the test can tell whether each
    question met its own answers. It fails the first request with HTTP 500 and answers without
    scores for the answers listed in ``malformed``. ``raw`` maps an answer to the reply to send for
    it as it is: a string is the message content, a dict replaces the whole response body.
    """

    def __init__(self, malformed: set[str] = frozenset(), fail_first: int = 1, raw: dict | None = None) -> None:
        self.requests: list[dict] = []
        self.malformed, self.fail_left, self.raw = malformed, fail_first, raw or {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    fail = outer.fail_left > 0
                    outer.fail_left -= fail
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found"}})
                if fail:
                    return self._send(500, {"error": {"message": "overloaded", "type": "server_error"}})
                self._send(200, outer.reply(body))

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def scores_for(answer1: str, answer2: str) -> tuple[int, int]:
        return 1 + len(answer1) % 10, 1 + len(answer2) % 10

    def reply(self, body: dict) -> dict:
        user = body["messages"][-1]["content"]
        answer1 = user.split("[Assistant 1]\n", 1)[1].split("\n\n[End of Assistant 1]", 1)[0]
        answer2 = user.split("[Assistant 2]\n", 1)[1].split("\n\n[End of Assistant 2]", 1)[0]
        if isinstance(self.raw.get(answer2), dict):
            return self.raw[answer2]
        if answer2 in self.raw:
            content = self.raw[answer2]
        elif answer2 in self.malformed:
            content = "Both assistants did reasonably well overall."
        else:
            a, b = self.scores_for(answer1, answer2)
            content = f"{a} {b}\nAssistant 2 is judged by length here."
        return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def judge_env(monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", API_KEY)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def test_judge_end_to_end(bench, tmp_path, judge_env, capsys, caplog):
    ours_rows = read_jsonl(bench / "llava_v1.5_13b_reference" / "answers_llava-v1.5-13b.jsonl")
    ours_by_id = {r["question_id"]: r for r in ours_rows}
    ref_by_id = {r["question_id"]: r for r in read_jsonl(bench / "answers_gpt4.jsonl")}
    bad_id = 7
    random.Random(1).shuffle(ours_rows)  # line order must not matter
    ours = write_jsonl(tmp_path / "answers_ours.jsonl", ours_rows)
    server = FakeJudgeServer(malformed={ours_by_id[bad_id]["text"]})
    out = tmp_path / "reviews" / "reviews_ours.jsonl"
    common = ["--question", str(bench / "questions.jsonl"), "--context", str(bench / "context.jsonl"),
              "--answer-list", str(bench / "answers_gpt4.jsonl"), str(ours),
              "--rule", str(bench.parent / "rule.json"), "--model", "judge-test-model",
              "--base-url", server.base_url, "--api-key-env", "JUDGE_TEST_KEY", "--retry-wait", "0.01"]
    args = [*common, "--output", str(out)]
    try:
        judge_llava_bench.main(args)
        first = capsys.readouterr()
        assert len(server.requests) == 61  # 60 questions + one retry after the 500
        reviews = read_jsonl(out)
        questions = read_jsonl(bench / "questions.jsonl")
        captions = {c["image"]: c["caption"] for c in read_jsonl(bench / "context.jsonl")}
        rules = json.loads((bench.parent / "rule.json").read_text())
        assert [r["question_id"] for r in reviews] == [q["question_id"] for q in questions]
        for q, r, req in zip(questions, reviews, server.requests[1:]):
            qid = q["question_id"]
            assert r["answer1_id"] == ref_by_id[qid]["answer_id"] and r["answer2_id"] == ours_by_id[qid]["answer_id"]
            assert r["category"] == f"llava_bench_{q['category']}" and r["scorer"] == "judge"
            assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {API_KEY}"
            body = req["body"]
            assert body["model"] == "judge-test-model" and body["temperature"] == 0.2
            user = body["messages"][-1]["content"]
            assert user.startswith(f"[Context]\n{captions[q['image']]}\n\n[Question]\n{q['text']}\n\n")
            assert user.endswith(f"[System]\n{rules[r['category']]['prompt']}\n\n")
            if qid == bad_id:
                assert r["tuple"] is None
            else:
                assert r["tuple"] == list(map(float, FakeJudgeServer.scores_for(ref_by_id[qid]["text"], ours_by_id[qid]["text"])))
        assert ("1 of 60 judge replies unusable (no two scores from 1 to 10 on the first line), "
                "excluded from the summary: question_id [7]") in first.out
        assert any("InternalServerError" in rec.getMessage() and "retry 1/5" in rec.getMessage() for rec in caplog.records)

        s = summarize_gpt_review.summarize_file(out)
        good = [(ref_by_id[i]["text"], ours_by_id[i]["text"]) for i in ref_by_id if i != bad_id]
        pairs = [FakeJudgeServer.scores_for(a, b) for a, b in good]
        assert s["excluded"] == 1 and s["count"] == 59
        assert s["all"] == pytest.approx(sum(p[1] for p in pairs) / sum(p[0] for p in pairs) * 100)

        # A rerun is served from the on-disk cache: no request, same file.
        before = out.read_bytes()
        judge_llava_bench.main(args)
        assert len(server.requests) == 61 and out.read_bytes() == before

        # LLaVA-compatible: the unparsable reply becomes [-1, -1] (still from the cache).
        compat = tmp_path / "reviews" / "reviews_compat.jsonl"
        judge_llava_bench.main([*common, "--output", str(compat), "--cache", str(out) + ".cache", "--llava-compat"])
        assert len(server.requests) == 61
        assert {r["question_id"]: r["tuple"] for r in read_jsonl(compat)}[bad_id] == [-1.0, -1.0]
        assert summarize_gpt_review.summarize_file(compat)["excluded"] == 1  # ours leaves [-1, -1] out
    finally:
        server.close()
    # The key reaches the server's Authorization header and nowhere else.
    logged = first.out + first.err + capsys.readouterr().out + caplog.text
    assert API_KEY not in logged
    for path in out.parent.iterdir():
        assert API_KEY not in path.read_text(), path


def test_judge_gives_up_after_retries(tmp_path, judge_env):
    server = FakeJudgeServer(fail_first=100)
    try:
        client = judge_llava_bench.openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
        cache = judge_llava_bench.JudgeCache(tmp_path / "cache")
        judge = judge_llava_bench.Judge(client, "m", cache, base_url=server.base_url, max_retries=2, retry_wait=0.001)
        with pytest.raises(RuntimeError, match="judge request failed 3 times, last: InternalServerError"):
            judge.review("[Assistant 1]\na\n\n[End of Assistant 1]\n\n[Assistant 2]\nb\n\n[End of Assistant 2]")
        assert len(server.requests) == 3 and not (tmp_path / "cache").exists()
    finally:
        server.close()


def test_judge_requires_api_key(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with pytest.raises(SystemExit):
        judge_llava_bench.main(["--question", str(bench / "questions.jsonl"), "--context", str(bench / "context.jsonl"),
                                "--answer-list", str(bench / "answers_gpt4.jsonl"), str(bench / "bard_0718.jsonl"),
                                "--output", str(tmp_path / "r.jsonl"), "--model", "m", "--api-key-env", "JUDGE_TEST_KEY"])
    assert "set $JUDGE_TEST_KEY" in capsys.readouterr().err


def test_default_rule_is_ours_in_llavas_schema():
    assert judge_llava_bench.DEFAULT_RULE == REPO / "llava_drip" / "eval" / "table" / "rule.json"
    rules = judge_llava_bench.load_rules(judge_llava_bench.DEFAULT_RULE)
    for cat in ("conv", "detail", "complex"):
        rule = rules[f"llava_bench_{cat}"]
        assert rule["role"] == "Assistant" and "two numbers from 1 to 10" in rule["prompt"]


def test_default_rule_is_not_llavas_text(bench):
    ours = judge_llava_bench.load_rules(judge_llava_bench.DEFAULT_RULE)
    llava = judge_llava_bench.load_rules(bench.parent / "rule.json")
    assert all(ours[k]["prompt"] != llava[k]["prompt"] for k in ours if k in llava)


def _small_bench(bench: Path, tmp_path: Path, n: int = 5) -> dict:
    questions = read_jsonl(bench / "questions.jsonl")[:n]
    return {"-q": write_jsonl(tmp_path / "questions.jsonl", questions), "-c": bench / "context.jsonl",
            "ids": [q["question_id"] for q in questions]}


def test_eval_gpt_review_bench_from_environment(bench, tmp_path, judge_env):
    """LLaVA's module name and flags, the endpoint and key from the openai client's variables only."""
    small = _small_bench(bench, tmp_path)
    servers = [FakeJudgeServer(fail_first=0), FakeJudgeServer(fail_first=0)]
    out = tmp_path / "reviews" / "reviews_bard.jsonl"
    argv = ["-q", small["-q"], "-c", small["-c"], "-r", bench.parent / "rule.json",
            "-a", bench / "answers_gpt4.jsonl", bench / "bard_0718.jsonl", "-o", out]
    env = {"OPENAI_API_KEY": API_KEY, "OPENAI_BASE_URL": servers[0].base_url}
    env_no_model = {k: v for k, v in os.environ.items() if k != "JUDGE_MODEL"}
    try:
        proc = subprocess.run([sys.executable, "llava_drip/eval/eval_gpt_review_bench.py", *map(str, argv)], cwd=REPO,
                              capture_output=True, text=True, timeout=60, env={**env_no_model, **env})
        assert proc.returncode == 0, proc.stderr
        assert [r["body"]["model"] for r in servers[0].requests] == ["gpt-4-0314"] * 5  # LLaVA's judge
        assert all(r["auth"] == f"Bearer {API_KEY}" for r in servers[0].requests)
        assert [r["question_id"] for r in read_jsonl(out)] == small["ids"]
        # $JUDGE_MODEL names another judge; the cache keys on it, so all five are asked again
        run_script("llava_drip/eval/eval_gpt_review_bench.py", *argv, env={**env, "JUDGE_MODEL": "other-judge"})
        assert [r["body"]["model"] for r in servers[0].requests[5:]] == ["other-judge"] * 5
        # the same judge at another $OPENAI_BASE_URL is another endpoint: not served from the cache
        run_script("llava_drip/eval/eval_gpt_review_bench.py", *argv,
                   env={**env, "JUDGE_MODEL": "other-judge", "OPENAI_BASE_URL": servers[1].base_url})
        assert len(servers[1].requests) == 5 and len(servers[0].requests) == 10
    finally:
        for server in servers:
            server.close()
    assert API_KEY not in out.read_text() + (out.parent / (out.name + ".cache")).read_text()


def test_judge_needs_two_answer_files(bench, tmp_path, judge_env, capsys):
    small = _small_bench(bench, tmp_path)
    with pytest.raises(SystemExit):
        judge_llava_bench.main(["-q", str(small["-q"]), "-c", str(small["-c"]), "-o", str(tmp_path / "r.jsonl"),
                                "-a", *(str(bench / f) for f in ("answers_gpt4.jsonl", "bard_0718.jsonl", "bing_chat_0629.jsonl"))])
    assert "--answer-list takes two files" in capsys.readouterr().err


class _EchoJudge:
    model = "echo"

    def __init__(self):
        self.contents: list[str] = []

    def review(self, content: str) -> str:
        self.contents.append(content)
        return "7 8\n"


def test_judge_joins_caption_lists_by_lines(tmp_path):
    """COCO's context files hold caption lists, joined by lines as LLaVA does; a string stays as it is."""
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 0, "image": "a.jpg", "text": "Q0", "category": "conv"},
                                           {"question_id": 1, "image": "b.jpg", "text": "Q1", "category": "conv"}])
    ctx = write_jsonl(tmp_path / "c.jsonl", [{"image": "a.jpg", "caption": ["a cat.", "a mat."]},
                                             {"image": "b.jpg", "caption": "a dog."}])
    ans = write_jsonl(tmp_path / "a.jsonl", [{"question_id": i, "text": f"A{i}"} for i in (0, 1)])
    judge = _EchoJudge()
    rules = judge_llava_bench.load_rules(judge_llava_bench.DEFAULT_RULE)
    reviews = judge_llava_bench.judge_all(judge, q, ctx, ans, ans, rules)
    assert judge.contents[0].startswith("[Context]\na cat.\na mat.\n\n[Question]\nQ0\n\n")
    assert judge.contents[1].startswith("[Context]\na dog.\n\n[Question]\nQ1\n\n")
    assert [r["tuple"] for r in reviews] == [[7.0, 8.0], [7.0, 8.0]]


@pytest.mark.parametrize("reply, expected", [
    ("8 9\nbecause", [8.0, 9.0]), ("8, 6.5\n", [8.0, 6.5]), ("  7  9 \nx", [7.0, 9.0]),
    ("Scores: 8 9", None), ("8\n9", None), ("", None), ("eight nine", None),
    ("10 1", [10.0, 1.0]), ("nan 9", None), ("9 NaN", None), ("inf 1", None), ("-Infinity 5", None),
    ("11 -3", None), ("1e308 1e308", None), ("0 5", None), ("-1 -1", None), ("10.5 8", None), (None, None),
])
def test_parse_scores(reply, expected):
    assert parse_scores(reply) == expected


def _choice_body(choices) -> dict:
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "m", "choices": choices}


# Replies from the issue "nothing silently wrong": each must end as an unusable review, never a crash
# nor a score. A string is the message content; a dict is the whole response body.
ODD_REPLIES = {
    "nan 9": "nan 9\nfine", "inf 1": "inf 1\n", "11 -3": "11 -3\n", "1e308 1e308": "1e308 1e308\n", "0 5": "0 5\n",
    "no choices": _choice_body([]),
    "null content": _choice_body([{"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "stop"}]),
    "no message": _choice_body([{"index": 0, "finish_reason": "content_filter"}]),
    "empty content": "",
}
EMPTY_REPLIES = ("no choices", "null content", "no message", "empty content")


def test_judge_odd_replies_are_unusable(tmp_path, judge_env, capsys, caplog):
    """Over HTTP: non-finite, out-of-range and empty replies give null tuples, a count, and a summary without them."""
    answers = ["a good answer", *ODD_REPLIES]
    n = len(ODD_REPLIES)
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": "a.jpg", "text": f"Q{i}", "category": "conv"}
                                           for i in range(len(answers))])
    ctx = write_jsonl(tmp_path / "c.jsonl", [{"image": "a.jpg", "caption": "a cat."}])
    ref = write_jsonl(tmp_path / "ref.jsonl", [{"question_id": i, "text": "ref"} for i in range(len(answers))])
    ours = write_jsonl(tmp_path / "ours.jsonl", [{"question_id": i, "text": a} for i, a in enumerate(answers)])
    server = FakeJudgeServer(fail_first=0, raw={"a good answer": "8 6\nok", **ODD_REPLIES})
    out = tmp_path / "reviews" / "reviews_odd.jsonl"
    common = ["-q", str(q), "-c", str(ctx), "-a", str(ref), str(ours), "--model", "m", "--base-url", server.base_url,
              "--api-key-env", "JUDGE_TEST_KEY", "--max-retries", "1", "--retry-wait", "0.001"]
    try:
        assert judge_llava_bench.main([*common, "-o", str(out)]) == 0
        text = capsys.readouterr().out
        reviews = read_jsonl(out)
        assert [r["tuple"] for r in reviews] == [[8.0, 6.0]] + [None] * n
        assert [r["content"] for r in reviews[-len(EMPTY_REPLIES):]] == [""] * len(EMPTY_REPLIES)
        # an empty reply is retried (here once), a scored one is not
        asked = [r["body"]["messages"][-1]["content"].split("[Assistant 2]\n", 1)[1].split("\n\n", 1)[0]
                 for r in server.requests]
        assert {a: asked.count(a) for a in answers} == {a: 2 if a in EMPTY_REPLIES else 1 for a in answers}
        assert any("judge reply without text" in rec.getMessage() for rec in caplog.records)
        assert (f"{n} of {n + 1} judge replies unusable (no two scores from 1 to 10 on the first line), "
                f"excluded from the summary: question_id {list(range(1, n + 1))}") in text
        row = next(line for line in text.splitlines() if line.startswith("reviews_odd "))
        assert row.split()[2:] == ["75.0", "75.0", "n/a", "n/a", "1", str(n)]
        assert f"reviews_odd: {n} of {n + 1} reviews unusable (no two finite scores from 1 to 10)" in text
        assert "nan" not in text.lower().replace("unusable", "")

        # Empty replies are not cached: a rerun asks for exactly those again, the rest come from the cache.
        before = len(server.requests)
        assert judge_llava_bench.main([*common, "-o", str(out)]) == 0
        assert len(server.requests) - before == 2 * len(EMPTY_REPLIES)

        # LLaVA's file format for LLaVA's summarizer; ours still leaves the [-1, -1] lines out
        compat = tmp_path / "reviews" / "reviews_compat.jsonl"
        assert judge_llava_bench.main([*common, "-o", str(compat), "--cache", str(out) + ".cache", "--llava-compat"]) == 0
        assert [r["tuple"] for r in read_jsonl(compat)] == [[8.0, 6.0]] + [[-1.0, -1.0]] * n
        s = summarize_gpt_review.summarize_file(compat)
        assert (s["count"], s["excluded"], s["all"]) == (1, n, 75.0)
        assert "written [-1, -1] (--llava-compat; LLaVA's summarizer averages them in, ours leaves them out)" in capsys.readouterr().out

        # nothing usable at all: no table, exit status 1
        only_bad = write_jsonl(tmp_path / "q_bad.jsonl", read_jsonl(q)[1:])
        bad_out = tmp_path / "reviews" / "reviews_allbad.jsonl"
        assert judge_llava_bench.main(["-q", str(only_bad), *common[2:], "-o", str(bad_out),
                                       "--cache", str(out) + ".cache"]) == 1
        assert "no usable judge reply: no score" in capsys.readouterr().out
    finally:
        server.close()
