"""model_vqa_science / model_vqa on the built-in tiny model and its synthetic ScienceQA and LLaVA-Bench.

End to end (convert -> answer -> score), batch invariance, resuming a crashed answers file, chunks,
missing images. Subsets of the questions keep it near a minute on 2 CPU cores; scripts run
in-process (their main) so the heavy imports are paid once.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from llava_drip.eval import convert_sqa, eval_science_qa, model_vqa, model_vqa_science, rule_scorer, summarize_gpt_review
from llava_drip.eval.answering import SINGLE_PRED_PROMPT, get_chunk
from tiny_model import tiny_llava  # noqa: F401  (fixture)

N_SQA = 12  # the first 12 synthetic problems: 9 with an image, 3 text-only
ANSWER_KEYS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def data_dir(tiny_llava, tmp_path_factory) -> Path:
    """The synthetic eval data built with the tiny model (or a fresh copy if the model came without it)."""
    data = Path(tiny_llava).parent / "data"
    if (data / "sqa" / "problems.json").is_file() and (data / "bench" / "questions.jsonl").is_file():
        return data
    from llava_drip.data import synth_llava
    data = tmp_path_factory.mktemp("synth-eval")
    synth_llava.main(["--out", str(data), "--n", "1", "--quiet"])
    return data


@pytest.fixture(scope="module")
def sqa(data_dir, tmp_path_factory) -> dict:
    """A ScienceQA question subset made with the teammate's converter."""
    work = tmp_path_factory.mktemp("sqa")
    full = work / "llava_test_CQM-A.json"
    assert convert_sqa.main(["--base-dir", str(data_dir / "sqa"), "--split", "test", "--output", str(full)]) == 0
    records = json.loads(full.read_text())[:N_SQA]
    n_text = sum("image" not in r for r in records)
    assert 0 < n_text < N_SQA  # mixed batches: text-only questions ride with a dummy image
    questions = work / "questions.json"
    questions.write_text(json.dumps(records))
    return {"work": work, "questions": questions, "images": data_dir / "sqa" / "images" / "test",
            "ids": [r["id"] for r in records], "records": records, "base_dir": data_dir / "sqa"}


def sqa_args(model: str, sqa: dict, answers: Path, *extra) -> list[str]:
    return ["--model-path", model, "--question-file", str(sqa["questions"]), "--image-folder", str(sqa["images"]),
            "--answers-file", str(answers), "--single-pred-prompt", "--temperature", "0", "--conv-mode", "vicuna_v1",
            "--max-new-tokens", "16",
            *map(str, extra)]


@pytest.fixture(scope="module")
def sqa_answers(tiny_llava, sqa) -> Path:
    """Answers of the subset at batch size 4: the reference the other tests compare with."""
    answers = sqa["work"] / "answers" / "b4.jsonl"
    summary = model_vqa_science.main(sqa_args(tiny_llava, sqa, answers, "--batch-size", 4))
    assert summary["answered"] == N_SQA and summary["resumed"] == 0
    return answers


def test_sqa_end_to_end(tiny_llava, sqa, sqa_answers, capsys):
    rows = read_jsonl(sqa_answers)
    assert [r["question_id"] for r in rows] == sqa["ids"]
    for rec, row in zip(sqa["records"], rows):
        assert set(row) == ANSWER_KEYS
        assert row["model_id"] == Path(tiny_llava).name
        assert row["prompt"].endswith("\n" + SINGLE_PRED_PROMPT)
        # LLaVA's recorded prompt: "<image>\n" + question for image questions, no template
        assert row["prompt"].startswith("<image>\n") == ("image" in rec)
        assert row["prompt"].replace("<image>\n", "", 1) == \
            rec["conversations"][0]["value"].replace("<image>", "").strip() + "\n" + SINGLE_PRED_PROMPT
        g = row["metadata"]["visual_tokens"]
        assert (g > 0) if "image" in rec else (g == 0)

    capsys.readouterr()
    assert eval_science_qa.main(["--question-file", str(sqa["questions"]), "--result-file", str(sqa_answers),
                                 "--base-dir", str(sqa["base_dir"]), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"accuracy", "img_accuracy", "correct", "total", "failed", "missing", "categories"} <= set(res)
    assert res["total"] == N_SQA and res["missing"] == 0
    assert 0 <= res["accuracy"] <= 100 and 0 <= res["img_accuracy"] <= 100


def test_sqa_batch_size_does_not_change_answers(tiny_llava, sqa, sqa_answers):
    b1 = sqa["work"] / "answers" / "b1.jsonl"
    model_vqa_science.main(sqa_args(tiny_llava, sqa, b1, "--batch-size", 1))
    ref = {r["question_id"]: (r["text"], r["metadata"]) for r in read_jsonl(sqa_answers)}
    got = {r["question_id"]: (r["text"], r["metadata"]) for r in read_jsonl(b1)}
    assert got == ref


def test_truncated_answers_file_resumes(tiny_llava, sqa, sqa_answers):
    answers = sqa["work"] / "answers" / "crashed.jsonl"
    lines = sqa_answers.read_text().splitlines(keepends=True)
    keep = N_SQA // 2
    answers.write_text("".join(lines[:keep]) + lines[keep][: len(lines[keep]) // 2])  # a crash mid-write
    summary = model_vqa_science.main(sqa_args(tiny_llava, sqa, answers, "--batch-size", 4))
    assert summary["dropped_partial_line"] and summary["resumed"] == keep and summary["answered"] == N_SQA - keep
    rows = read_jsonl(answers)
    assert sorted(r["question_id"] for r in rows) == sorted(sqa["ids"])  # every id exactly once
    assert {r["question_id"]: r["text"] for r in rows} == {r["question_id"]: r["text"] for r in read_jsonl(sqa_answers)}

    again = model_vqa_science.main(sqa_args(tiny_llava, sqa, answers))  # complete: nothing to do
    assert again["answered"] == 0 and again["resumed"] == N_SQA


def test_resume_refuses_answers_made_with_another_prompt(tiny_llava, sqa, sqa_answers):
    answers = sqa["work"] / "answers" / "other-prompt.jsonl"
    shutil.copy(sqa_answers, answers)
    args = [a for a in sqa_args(tiny_llava, sqa, answers) if a != "--single-pred-prompt"]
    with pytest.raises(ValueError, match="single-pred-prompt"):
        model_vqa_science.main(args)


def test_get_chunk_is_llavas_ceil_split():
    items = list(range(10))
    assert [get_chunk(items, 3, k) for k in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [get_chunk([0, 1], 3, k) for k in range(3)] == [[0], [1], []]
    with pytest.raises(ValueError):
        get_chunk(items, 2, 2)


def test_chunks_cover_all_questions_disjointly(tiny_llava, sqa):
    sub = sqa["work"] / "five.json"
    sub.write_text(json.dumps(sqa["records"][:5]))
    ids = [r["id"] for r in sqa["records"][:5]]
    got = []
    for k in range(2):
        out = sqa["work"] / "chunks" / f"2_{k}.jsonl"
        args = sqa_args(tiny_llava, {**sqa, "questions": sub}, out, "--num-chunks", 2, "--chunk-idx", k, "--batch-size", 4)
        model_vqa_science.main(args)
        got.append([r["question_id"] for r in read_jsonl(out)])
    assert got == [ids[:math.ceil(5 / 2)], ids[math.ceil(5 / 2):]]


def test_missing_images(tiny_llava, sqa, tmp_path):
    records = [r for r in sqa["records"] if "image" in r][:2] + [r for r in sqa["records"] if "image" not in r][:1]
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(records))
    base = ["--model-path", tiny_llava, "--question-file", str(questions), "--image-folder", str(tmp_path / "none"),
            "--answers-file", str(tmp_path / "a.jsonl"), "--conv-mode", "vicuna_v1", "--max-new-tokens", "4"]
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none" / records[0]["image"])):
        model_vqa_science.main(base)
    summary = model_vqa_science.main(base + ["--skip-missing-images"])
    assert summary["skipped_missing_images"] == 2 and summary["answered"] == 1
    assert [r["question_id"] for r in read_jsonl(tmp_path / "a.jsonl")] == [records[2]["id"]]


def test_llava_bench_answer_and_score(tiny_llava, data_dir, tmp_path, capsys):
    bench = data_dir / "bench"
    questions = read_jsonl(bench / "questions.jsonl")[:6]  # two images, each conv / detail / complex
    assert {q["category"] for q in questions} == {"conv", "detail", "complex"}
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = {}
    for bs in (4, 1):
        answers[bs] = tmp_path / f"answers_b{bs}.jsonl"
        model_vqa.main(["--model-path", tiny_llava, "--question-file", str(qfile), "--image-folder", str(bench / "images"),
                        "--answers-file", str(answers[bs]), "--temperature", "0", "--conv-mode", "vicuna_v1",
                        "--max-new-tokens", "32",
                        "--batch-size", str(bs)])
    rows = read_jsonl(answers[4])
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions]  # ints stay ints
    assert all(set(r) == ANSWER_KEYS and r["metadata"]["visual_tokens"] > 0 for r in rows)
    assert [r["prompt"] for r in rows] == [q["text"] for q in questions]
    assert [r["text"] for r in rows] == [r["text"] for r in read_jsonl(answers[1])]  # batch invariance

    review = tmp_path / "reviews" / "rule.jsonl"
    assert rule_scorer.main(["--question", str(qfile), "--answer-list", str(bench / "answers_ref.jsonl"),
                             str(answers[4]), "--output", str(review)]) == 0
    capsys.readouterr()
    assert summarize_gpt_review.main(["-f", str(review), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    run = summary["runs"][0]
    assert run["count"] == 6 and run["scorer"] == "rule"
    for key in ("all", "conv", "detail", "complex"):
        assert 0 <= run[key] <= 100


def test_answer_prompter_asks_twice(tiny_llava, sqa, tmp_path):
    """LLaVA's --answer-prompter: the first reply, then " The answer is " and a second, short reply."""
    records = sqa["records"][:3]
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(records))
    common = ["--model-path", tiny_llava, "--question-file", str(questions), "--image-folder", str(sqa["images"]),
              "--temperature", "0", "--conv-mode", "vicuna_v1", "--max-new-tokens", "16"]
    model_vqa_science.main(common + ["--answers-file", str(tmp_path / "one.jsonl")])
    model_vqa_science.main(common + ["--answers-file", str(tmp_path / "two.jsonl"), "--answer-prompter"])
    one, two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "two.jsonl")
    assert [r["prompt"] for r in one] == [r["prompt"] for r in two]  # LLaVA records the question, not the passes
    for a, b in zip(one, two):
        assert b["text"].startswith(a["text"] + "\n The answer is ")
        assert b["metadata"] == a["metadata"]  # visual tokens of the question's image, counted once


def test_unreadable_image_is_skipped_recorded_and_retried_on_request(tiny_llava, sqa, tmp_path, capsys):
    """A broken image costs its question, not the run: the rest is answered, the skip is listed beside the
    answers file and counted, a resume leaves it alone, and --retry-skipped tries it again once fixed."""
    with_image = [r for r in sqa["records"] if "image" in r][:2]
    images = tmp_path / "images"
    for r in with_image:
        (images / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sqa["images"] / r["image"], images / r["image"])
    broken = images / with_image[1]["image"]
    broken.write_bytes(broken.read_bytes()[:100])  # cut short, as an interrupted copy leaves it
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(with_image))
    answers = tmp_path / "a.jsonl"
    base = ["--model-path", tiny_llava, "--question-file", str(questions), "--image-folder", str(images),
            "--answers-file", str(answers), "--conv-mode", "vicuna_v1", "--max-new-tokens", "4", "--batch-size", "2"]
    first = model_vqa_science.main(base)
    assert first["answered"] == 1 and first["skipped_unreadable_images"] == 1
    assert "SKIPPED 1 questions whose image cannot be read" in capsys.readouterr().out
    assert [r["question_id"] for r in read_jsonl(answers)] == [with_image[0]["id"]]
    assert [r["question_id"] for r in read_jsonl(Path(str(answers) + ".skipped"))] == [with_image[1]["id"]]

    shutil.copy(sqa["images"] / with_image[1]["image"], broken)  # fixed
    again = model_vqa_science.main(base)  # a plain resume does not retry it
    assert again["answered"] == 0 and again["resumed"] == 1 and again["skipped_unreadable_images"] == 1
    retried = model_vqa_science.main(base + ["--retry-skipped"])
    assert retried["answered"] == 1 and retried["skipped_unreadable_images"] == 0
    assert sorted(r["question_id"] for r in read_jsonl(answers)) == sorted(r["id"] for r in with_image)
    assert not Path(str(answers) + ".skipped").exists()
