"""LLaVA's own eval scripts run on llava-drip, and so do this project's launchers in eval/.

SQA_SH and LLAVABENCH_SH are haotian-liu/LLaVA's scripts/v1_5/eval/sqa.sh and llavabench.sh
with only ``llava.`` -> ``llava_drip.`` and ``llava/`` -> ``llava_drip/`` changed. They run as
shell scripts, with ``python`` found on PATH (this venv's), in a folder laid out as a LLaVA
checkout: ./playground/data/eval/..., ./llava_drip (this package, linked) and
./liuhaotian/llava-v1.5-13b holding the tiny model (a hub id that names an existing folder loads
from it, as transformers does). The data are the synthetic ScienceQA / LLaVA-Bench files of
``llava-drip synth llava``, a handful of questions each. The scripts pass no
``--max_new_tokens``, so generation runs under LLaVA's 1024; the tiny model ends its answers
with EOS after a few tokens. The judge is the fake OpenAI-compatible server of
test_eval_llavabench.py, reached through $OPENAI_BASE_URL with a dummy $OPENAI_API_KEY.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llava_drip.conversation import get_conv_template
from llava_drip.eval import convert_sqa
from llava_drip.eval.answering import SINGLE_PRED_PROMPT
from llava_drip.eval.judge_llava_bench import DEFAULT_JUDGE_MODEL, DEFAULT_RULE
from test_eval_llavabench import FakeJudgeServer
from tiny_model import tiny_llava  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-dummy-for-the-fake-judge"
N_SQA = 6    # the first 6 synthetic test problems: 4 with an image, 2 text-only
N_BENCH = 6  # two images, each with a conv, a detail and a complex question

SQA_SH = r"""#!/bin/bash

python -m llava_drip.eval.model_vqa_science \
    --model-path liuhaotian/llava-v1.5-13b \
    --question-file ./playground/data/eval/scienceqa/llava_test_CQM-A.json \
    --image-folder ./playground/data/eval/scienceqa/images/test \
    --answers-file ./playground/data/eval/scienceqa/answers/llava-v1.5-13b.jsonl \
    --single-pred-prompt \
    --temperature 0 \
    --conv-mode vicuna_v1

python llava_drip/eval/eval_science_qa.py \
    --base-dir ./playground/data/eval/scienceqa \
    --result-file ./playground/data/eval/scienceqa/answers/llava-v1.5-13b.jsonl \
    --output-file ./playground/data/eval/scienceqa/answers/llava-v1.5-13b_output.jsonl \
    --output-result ./playground/data/eval/scienceqa/answers/llava-v1.5-13b_result.json
"""

LLAVABENCH_SH = r"""#!/bin/bash

python -m llava_drip.eval.model_vqa \
    --model-path liuhaotian/llava-v1.5-13b \
    --question-file ./playground/data/eval/llava-bench-in-the-wild/questions.jsonl \
    --image-folder ./playground/data/eval/llava-bench-in-the-wild/images \
    --answers-file ./playground/data/eval/llava-bench-in-the-wild/answers/llava-v1.5-13b.jsonl \
    --temperature 0 \
    --conv-mode vicuna_v1

mkdir -p playground/data/eval/llava-bench-in-the-wild/reviews

python llava_drip/eval/eval_gpt_review_bench.py \
    --question playground/data/eval/llava-bench-in-the-wild/questions.jsonl \
    --context playground/data/eval/llava-bench-in-the-wild/context.jsonl \
    --rule llava_drip/eval/table/rule.json \
    --answer-list \
        playground/data/eval/llava-bench-in-the-wild/answers_gpt4.jsonl \
        playground/data/eval/llava-bench-in-the-wild/answers/llava-v1.5-13b.jsonl \
    --output \
        playground/data/eval/llava-bench-in-the-wild/reviews/llava-v1.5-13b.jsonl

python llava_drip/eval/summarize_gpt_review.py -f playground/data/eval/llava-bench-in-the-wild/reviews/llava-v1.5-13b.jsonl
"""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def synth_data(tiny_llava, tmp_path_factory) -> Path:
    """The synthetic eval data built with the tiny model (or a fresh copy if the model came without it)."""
    data = Path(tiny_llava).parent / "data"
    if (data / "sqa" / "problems.json").is_file() and (data / "bench" / "questions.jsonl").is_file():
        return data
    from llava_drip.data import synth_llava
    data = tmp_path_factory.mktemp("synth-eval")
    synth_llava.main(["--out", str(data), "--n", "1", "--quiet"])
    return data


@pytest.fixture(scope="module")
def checkout(tiny_llava, synth_data, tmp_path_factory) -> Path:
    """A folder laid out as LLaVA's scripts expect their working directory to be."""
    root = tmp_path_factory.mktemp("llava-checkout")
    (root / "llava_drip").symlink_to(REPO / "llava_drip", target_is_directory=True)
    shutil.copytree(tiny_llava, root / "liuhaotian" / "llava-v1.5-13b")

    sqa = root / "playground" / "data" / "eval" / "scienceqa"
    problems = json.loads((synth_data / "sqa" / "problems.json").read_text())
    pids = [str(p) for p in json.loads((synth_data / "sqa" / "pid_splits.json").read_text())["test"]][:N_SQA]
    assert 0 < sum(problems[p]["image"] is None for p in pids) < N_SQA  # text-only and image questions
    (sqa / "images" / "test").mkdir(parents=True)
    (sqa / "problems.json").write_text(json.dumps({p: problems[p] for p in pids}))
    (sqa / "pid_splits.json").write_text(json.dumps({"test": pids}))
    (sqa / "llava_test_CQM-A.json").write_text(json.dumps(convert_sqa.convert(problems, pids)))
    for p in pids:
        if problems[p]["image"]:
            shutil.copytree(synth_data / "sqa" / "images" / "test" / p, sqa / "images" / "test" / p)

    bench = root / "playground" / "data" / "eval" / "llava-bench-in-the-wild"
    (bench / "images").mkdir(parents=True)
    questions = read_jsonl(synth_data / "bench" / "questions.jsonl")[:N_BENCH]
    assert {q["category"] for q in questions} == {"conv", "detail", "complex"}
    write_jsonl(bench / "questions.jsonl", questions)
    images = {q["image"] for q in questions}
    write_jsonl(bench / "context.jsonl", [c for c in read_jsonl(synth_data / "bench" / "context.jsonl") if c["image"] in images])
    shutil.copy(synth_data / "bench" / "answers_ref.jsonl", bench / "answers_gpt4.jsonl")
    for name in images:
        shutil.copy(synth_data / "bench" / "images" / name, bench / "images" / name)
    return root


@pytest.fixture()
def judge():
    server = FakeJudgeServer(fail_first=0)
    yield server
    server.close()


def script_env(judge: FakeJudgeServer) -> dict:
    """The environment a user's shell gives the scripts: this venv's python first on PATH, the
    judge's endpoint and key in the openai client's variables, and nothing that changes our defaults."""
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "JUDGE_MODEL", "PYTHONPATH")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL=judge.base_url, NO_PROXY="127.0.0.1,localhost")
    return env


def run_script(script: Path | str, cwd: Path, env: dict, *args: str) -> str:
    proc = subprocess.run(["bash", str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{script} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def check_reviews(reviews: list[dict], questions: list[dict], reference: list[dict], answers: list[dict],
                  requests: list[dict], model: str):
    ref = {r["question_id"]: r["text"] for r in reference}
    ours = {r["question_id"]: r["text"] for r in answers}
    rules = json.loads(DEFAULT_RULE.read_text())
    assert [r["question_id"] for r in reviews] == [q["question_id"] for q in questions]
    for q, r in zip(questions, reviews):
        assert r["category"] == f"llava_bench_{q['category']}"
        qid = q["question_id"]
        assert r["tuple"] == list(map(float, FakeJudgeServer.scores_for(ref[qid], ours[qid])))
    assert len(requests) == len(questions)
    for req, r in zip(requests, reviews):
        assert req["auth"] == f"Bearer {API_KEY}" and req["body"]["model"] == model
        assert req["body"]["max_tokens"] == 1024 and req["body"]["temperature"] == 0.2
        assert req["body"]["messages"][-1]["content"].endswith(f"[System]\n{rules[r['category']]['prompt']}\n\n")


def test_llava_sqa_script(checkout, judge, tmp_path):
    script = tmp_path / "sqa.sh"
    script.write_text(SQA_SH)
    out = run_script(script, checkout, script_env(judge))
    sqa = checkout / "playground" / "data" / "eval" / "scienceqa"
    questions = json.loads((sqa / "llava_test_CQM-A.json").read_text())
    answers = read_jsonl(sqa / "answers" / "llava-v1.5-13b.jsonl")
    assert [a["question_id"] for a in answers] == [q["id"] for q in questions]
    for q, a in zip(questions, answers):
        assert a["model_id"] == "llava-v1.5-13b"  # the name from the hub-style id, as LLaVA's
        assert a["prompt"].endswith("\n" + SINGLE_PRED_PROMPT)
        assert a["prompt"].startswith("<image>\n") == ("image" in q)

    result = json.loads((sqa / "answers" / "llava-v1.5-13b_result.json").read_text())
    analysis = json.loads((sqa / "answers" / "llava-v1.5-13b_output.jsonl").read_text())
    assert result["count"] == N_SQA and set(result["results"]) == {q["id"] for q in questions}
    assert result["correct"] == len(analysis["correct"]) and len(analysis["correct"]) + len(analysis["incorrect"]) == N_SQA
    assert result["acc"] == pytest.approx(100 * result["correct"] / N_SQA)
    assert f"Total: {N_SQA}, Correct: {result['correct']}, Accuracy:" in out
    assert "NAT     SOC     LAN" in out  # --base-dir brings problems.json's category table
    assert judge.requests == []


def test_llava_llavabench_script(checkout, judge, tmp_path):
    script = tmp_path / "llavabench.sh"
    script.write_text(LLAVABENCH_SH)
    out = run_script(script, checkout, script_env(judge))
    bench = checkout / "playground" / "data" / "eval" / "llava-bench-in-the-wild"
    questions = read_jsonl(bench / "questions.jsonl")
    answers = read_jsonl(bench / "answers" / "llava-v1.5-13b.jsonl")
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert all(a["model_id"] == "llava-v1.5-13b" and a["text"] for a in answers)
    reviews = read_jsonl(bench / "reviews" / "llava-v1.5-13b.jsonl")
    # no --model in LLaVA's script: the judge is LLaVA's GPT-4 snapshot
    check_reviews(reviews, questions, read_jsonl(bench / "answers_gpt4.jsonl"), answers, judge.requests, DEFAULT_JUDGE_MODEL)
    assert "Average  Conversation  Detail  Reasoning" in out and "llava-v1.5-13b" in out


def test_project_launchers(checkout, judge):
    """eval/sqa.sh and eval/llavabench.sh from the same working directory (their default data paths)."""
    env = {**script_env(judge), "JUDGE_MODEL": "judge-test-model", "JUDGE_RUNS": "2"}
    out = run_script(REPO / "eval" / "sqa.sh", checkout, env, "liuhaotian/llava-v1.5-13b", "drip")
    sqa = checkout / "playground" / "data" / "eval" / "scienceqa"
    assert len(read_jsonl(sqa / "answers" / "drip.jsonl")) == N_SQA
    assert json.loads((sqa / "answers" / "drip_result.json").read_text())["count"] == N_SQA
    assert f"Total: {N_SQA}, Correct:" in out and "NAT     SOC     LAN" in out

    out = run_script(REPO / "eval" / "llavabench.sh", checkout, env, "liuhaotian/llava-v1.5-13b", "drip")
    bench = checkout / "playground" / "data" / "eval" / "llava-bench-in-the-wild"
    questions, answers = read_jsonl(bench / "questions.jsonl"), read_jsonl(bench / "answers" / "drip.jsonl")
    reference = read_jsonl(bench / "answers_gpt4.jsonl")
    for run in (1, 2):  # each run has its own cache, so each asks the judge again
        reviews = read_jsonl(bench / "reviews" / "drip" / f"judge-eval{run}.jsonl")
        check_reviews(reviews, questions, reference, answers,
                      judge.requests[(run - 1) * N_BENCH:run * N_BENCH], "judge-test-model")
    assert len(read_jsonl(bench / "reviews" / "drip" / "rule.jsonl")) == N_BENCH
    assert "mean of 2 runs" in out and "unrounded mean" in out
    assert "== rule-based, relative to the GPT-4 answers" in out


# ---------------------------------------------------------------- LLaVA's flags and defaults

def _upstream_cases():
    from llava_drip.eval import eval_science_qa, judge_llava_bench, model_vqa, model_vqa_science, summarize_gpt_review
    vqa = {"model_base": None, "image_folder": "", "answers_file": "answer.jsonl", "num_chunks": 1, "chunk_idx": 0,
           "temperature": 0.2, "max_new_tokens": 1024}  # 1024: the number LLaVA hard-codes in generate
    return [
        # (module, argv giving only what we require, LLaVA's defaults for the rest)
        (model_vqa_science, ["--model-path", "m", "--question-file", "q.json"],
         {**vqa, "conv_mode": "llava_v0", "answer_prompter": False, "single_pred_prompt": False}),
        (model_vqa, ["--model-path", "m", "--question-file", "q.jsonl"],
         {**vqa, "conv_mode": "llava_v1", "top_p": None, "num_beams": 1}),
        (eval_science_qa, ["--result-file", "r.jsonl"],
         {"base_dir": None, "output_file": None, "output_result": None, "split": "test",
          "options": ["A", "B", "C", "D", "E"]}),
        (judge_llava_bench, ["-q", "q", "-c", "c", "-a", "a1", "a2", "-r", "r", "-o", "o"],
         {"max_tokens": 1024, "model": DEFAULT_JUDGE_MODEL}),
        (summarize_gpt_review, [], {"dir": None, "version": None, "select": None, "files": [], "ignore": []}),
    ]


@pytest.mark.parametrize("case", range(5))
def test_llava_flags_and_defaults(case, monkeypatch):
    monkeypatch.delenv("JUDGE_MODEL", raising=False)
    module, argv, defaults = _upstream_cases()[case]
    args = vars(module.build_parser().parse_args(argv))
    assert {k: args[k] for k in defaults} == defaults
    if "conv_mode" in args:
        get_conv_template(args["conv_mode"])  # the default names a template that exists


def test_llava_short_flags():
    from llava_drip.eval import judge_llava_bench, summarize_gpt_review
    args = judge_llava_bench.build_parser().parse_args(
        ["-q", "q.jsonl", "-c", "c.jsonl", "-a", "ref.jsonl", "ours.jsonl", "-r", "rule.json", "-o", "out.jsonl",
         "--max-tokens", "77"])
    assert (str(args.question), str(args.context), [str(a) for a in args.answer_list], str(args.rule), str(args.output),
            args.max_tokens) == ("q.jsonl", "c.jsonl", ["ref.jsonl", "ours.jsonl"], "rule.json", "out.jsonl", 77)
    args = summarize_gpt_review.build_parser().parse_args(["-d", "D", "-v", "0613", "-s", "a", "b", "-f", "x", "-i", "3"])
    assert (args.dir, args.version, args.select, args.files, args.ignore) == ("D", "0613", ["a", "b"], ["x"], ["3"])
