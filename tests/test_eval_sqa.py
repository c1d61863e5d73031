"""ScienceQA scorer and converter, checked against LLaVA-1.5-13B's published files.

Real data comes from $LLAVA_DRIP_DATA (conftest.py's shared_data); those tests skip without it.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava_drip.eval import convert_sqa, eval_science_qa
from llava_drip.eval.eval_science_qa import FAILED, parse_answer, parse_choices

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sqa_dir(shared_data: Path) -> Path:
    path = shared_data / "scienceqa"
    if not (path / "llava_eval" / "llava_test_CQM-A.json").is_file():
        pytest.skip(f"{path} has no llava_eval/llava_test_CQM-A.json")
    return path


def run_module(module: str, *args: str) -> str:
    """Run ``python -m module`` as a user would; return stdout."""
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("text, expected", [
    ("A", "A"), ("E", "E"), ("A.", FAILED), ("B. apostrophe", "B"), ("C. cup", "C"),
    ("The answer is D.", "D"), ("I think so. The answer is B. Yes", "B"),
    ("The answer is A. The answer is B.", FAILED),  # LLaVA needs exactly one match
    ("B is the run-on sentence.", FAILED), ("Cinder", FAILED), ("F. no", FAILED), ("", FAILED),
])
def test_parse_answer_rules(text, expected):
    assert parse_answer(text) == expected


def test_parse_choices_multiline_options():
    prompt = "Which closing is correct?\nA. See you soon,\nJanet\nB. see you soon,\nJanet"
    assert parse_choices(prompt) == ["See you soon,\nJanet", "see you soon,\nJanet"]


def test_parsing_matches_published_output(sqa_dir):
    out = json.loads((sqa_dir / "llava_eval" / "llava-v1.5-13b_output.jsonl").read_text())
    rows = out["correct"] + out["incorrect"]
    assert len(rows) == 4241
    assert [parse_answer(r["pred"]) for r in rows] == [r["parsed_ans"] for r in rows]


def test_choices_match_rebuilt_test_split(sqa_dir):
    questions = eval_science_qa.load_questions(sqa_dir / "llava_eval" / "llava_test_CQM-A.json")
    with open(sqa_dir / "scienceqa_test_from_llava_cqm.jsonl") as f:
        ref = [json.loads(line) for line in f]
    assert {r["pid"]: r["choices"] for r in ref} == {k: list(q.choices) for k, q in questions.items()}
    assert sum(q.has_image for q in questions.values()) == 2017


def test_reproduces_llava_15_13b(sqa_dir, tmp_path):
    ev = sqa_dir / "llava_eval"
    out = run_module("llava_drip.eval.eval_science_qa", "--question-file", ev / "llava_test_CQM-A.json",
                     "--result-file", ev / "llava-v1.5-13b_answers.jsonl", "--json",
                     "--output-result", tmp_path / "result.json", "--output-file", tmp_path / "output.json")
    res = json.loads(out)
    assert round(res["img_accuracy"], 2) == 71.64
    assert round(res["accuracy"], 2) == 74.39
    assert (res["correct"], res["total"], res["img_total"], res["failed"], res["missing"]) == (3155, 4241, 2017, 5, 0)
    # Per-question predicted indices and the correct/incorrect analysis are LLaVA's, file for file.
    ours, published = json.loads((tmp_path / "result.json").read_text()), json.loads((ev / "llava-v1.5-13b_result.json").read_text())
    assert ours["results"] == published["results"] and ours["outputs"] == published["outputs"]
    assert ours["correct"] == published["correct"] == 3155
    assert json.loads((tmp_path / "output.json").read_text()) == json.loads((ev / "llava-v1.5-13b_output.jsonl").read_text())


def test_text_report(sqa_dir, capsys):
    ev = sqa_dir / "llava_eval"
    eval_science_qa.main(["--question-file", str(ev / "llava_test_CQM-A.json"),
                          "--result-file", str(ev / "llava-v1.5-13b_answers.jsonl")])
    out = capsys.readouterr().out
    assert "Total: 4241, Correct: 3155, Accuracy: 74.39%, IMG-Accuracy: 71.64%" in out
    assert "Unparsed answers (counted wrong): 5" in out


@pytest.fixture()
def small_base_dir(sqa_dir, tmp_path) -> Path:
    """problems.json with the 150 canonical problems and a split holding their 50 test ids."""
    problems = json.loads((sqa_dir / "problems_small_150_mmcot.json").read_text())
    official = json.loads((sqa_dir / "pid_splits.json").read_text())["test"]
    base = tmp_path / "sqa"
    base.mkdir()
    (base / "problems.json").write_text(json.dumps(problems))
    (base / "pid_splits.json").write_text(json.dumps({"test": [p for p in official if p in problems]}))
    return base


def test_converter_matches_llava_question_file(sqa_dir, small_base_dir):
    out = small_base_dir / "llava_test_CQM-A.json"
    convert_sqa.main(["--base-dir", str(small_base_dir), "--split", "test", "--output", str(out)])
    ours = json.loads(out.read_text())
    llava = {r["id"]: r for r in json.loads((sqa_dir / "llava_eval" / "llava_test_CQM-A.json").read_text())}
    assert len(ours) == 50 and sum("image" in r for r in ours) > 0 and sum("image" not in r for r in ours) > 0
    for rec in ours:
        # Same keys in the same order, same strings.
        assert json.dumps(rec) == json.dumps(llava[rec["id"]])


def test_converter_rejects_unknown_ids(small_base_dir, tmp_path):
    (small_base_dir / "pid_splits.json").write_text(json.dumps({"test": ["4", "999999"]}))
    with pytest.raises(KeyError, match="1 of 2 split ids"):
        convert_sqa.main(["--base-dir", str(small_base_dir), "--output", str(tmp_path / "q.json")])


def test_category_table(sqa_dir, small_base_dir, capsys):
    q_file = small_base_dir / "q.json"
    convert_sqa.main(["--base-dir", str(small_base_dir), "--output", str(q_file)])
    capsys.readouterr()
    ev = sqa_dir / "llava_eval"
    answers = ev / "llava-v1.5-13b_answers.jsonl"
    eval_science_qa.main(["--question-file", str(q_file), "--result-file", str(answers),
                          "--base-dir", str(small_base_dir), "--json"])
    res = json.loads(capsys.readouterr().out)
    # Expected table from the published correct/incorrect lists and the problems' metadata.
    published = json.loads((ev / "llava-v1.5-13b_output.jsonl").read_text())
    right = {r["question_id"] for r in published["correct"]}
    problems = json.loads((small_base_dir / "problems.json").read_text())
    test_ids = json.loads((small_base_dir / "pid_splits.json").read_text())["test"]
    def expected(pred):
        ids = [p for p in test_ids if pred(problems[p])]
        return {"accuracy": 100 * sum(p in right for p in ids) / len(ids), "count": len(ids)}
    grade = lambda p: int(p["grade"][5:])
    want = {
        "NAT": expected(lambda p: p["subject"] == "natural science"),
        "SOC": expected(lambda p: p["subject"] == "social science"),
        "LAN": expected(lambda p: p["subject"] == "language science"),
        "TXT": expected(lambda p: p["hint"] != ""),
        "IMG": expected(lambda p: p["image"] is not None),
        "NO": expected(lambda p: p["hint"] == "" and p["image"] is None),
        "G1-6": expected(lambda p: grade(p) <= 6),
        "G7-12": expected(lambda p: grade(p) > 6),
    }
    assert list(res["categories"]) == list(want)
    for cat, w in want.items():
        assert res["categories"][cat] == {"accuracy": pytest.approx(w["accuracy"]), "count": w["count"]}, cat
    assert res["total"] == res["categories_count"] == 50
    assert res["accuracy"] == pytest.approx(100 * sum(p in right for p in test_ids) / 50)

    eval_science_qa.main(["--question-file", str(ev / "llava_test_CQM-A.json"), "--result-file", str(answers),
                          "--base-dir", str(small_base_dir)])
    out = capsys.readouterr().out
    assert "Categories over the 50 of 4241 questions found in problems.json" in out
    assert "NAT     SOC     LAN     TXT     IMG      NO    G1-6   G7-12     Avg" in out


def test_base_dir_alone_as_llava(sqa_dir, small_base_dir, tmp_path):
    """LLaVA's call: --base-dir only (problems.json + pid_splits.json[--split]), as a plain script."""
    answers = sqa_dir / "llava_eval" / "llava-v1.5-13b_answers.jsonl"
    out = {}
    for mode, extra in (("base", []), ("qfile", ["--question-file", small_base_dir / "q.json"])):
        if mode == "qfile":
            convert_sqa.main(["--base-dir", str(small_base_dir), "--output", str(small_base_dir / "q.json")])
        proc = subprocess.run([sys.executable, "llava_drip/eval/eval_science_qa.py", "--base-dir", str(small_base_dir),
                               "--result-file", str(answers), *map(str, extra),
                               "--output-file", str(tmp_path / f"{mode}_output.jsonl"),
                               "--output-result", str(tmp_path / f"{mode}_result.json")],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        out[mode] = proc.stdout
    assert out["base"] == out["qfile"]
    assert "Total: 50, Correct:" in out["base"] and "NAT     SOC     LAN" in out["base"]
    for name in ("output.jsonl", "result.json"):
        assert (tmp_path / f"base_{name}").read_text() == (tmp_path / f"qfile_{name}").read_text()
    # the 50 problems' predicted indices are LLaVA's published ones
    published = json.loads((sqa_dir / "llava_eval" / "llava-v1.5-13b_result.json").read_text())["results"]
    ours = json.loads((tmp_path / "base_result.json").read_text())["results"]
    assert len(ours) == 50 and ours == {k: published[k] for k in ours}


def test_base_dir_split_and_options(small_base_dir, tmp_path, capsys):
    splits = json.loads((small_base_dir / "pid_splits.json").read_text())
    splits["minitest"] = splits["test"][:7]
    (small_base_dir / "pid_splits.json").write_text(json.dumps(splits))
    answers = _write(tmp_path / "r.jsonl", "".join(json.dumps({"question_id": p, "prompt": "", "text": "A"}) + "\n"
                                                   for p in splits["test"]))
    base = ["--base-dir", str(small_base_dir), "--result-file", str(answers), "--json"]
    results = []
    for extra in (["--split", "minitest"], ["--split", "minitest", "--options", "ABCDE"],
                  ["--split", "minitest", "--options", "A", "B", "C", "D", "E"]):
        eval_science_qa.main(base + extra)
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["total"] == 7 and results[0] == results[1] == results[2]
    with pytest.raises(KeyError, match="split 'nosuch' not in"):
        eval_science_qa.main(base + ["--split", "nosuch"])
    with pytest.raises(SystemExit):
        eval_science_qa.main(["--result-file", str(answers)])
    assert "give --base-dir" in capsys.readouterr().err


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _tiny_question_file(tmp_path: Path) -> Path:
    recs = [{"id": str(i), "conversations": [{"from": "human", "value": f"Q{i}\nA. yes\nB. no"},
                                            {"from": "gpt", "value": "A"}]} for i in range(4)]
    recs[0]["image"] = "0/image.png"
    return _write(tmp_path / "q.json", json.dumps(recs))


def test_missing_answers_count_as_wrong(tmp_path):
    q = _tiny_question_file(tmp_path)
    r = _write(tmp_path / "r.jsonl", "".join(json.dumps({"question_id": str(i), "prompt": "", "text": t}) + "\n"
                                             for i, t in [(0, "A"), (1, "The answer is A."), (2, "B")]))
    questions = eval_science_qa.load_questions(q)
    from llava_drip.eval.io_utils import read_jsonl_by_id
    res = eval_science_qa.score(questions, read_jsonl_by_id(r))
    assert (res["correct"], res["total"], res["missing"], res["failed"]) == (2, 4, 1, 1)
    assert res["accuracy"] == 50.0 and res["img_accuracy"] == 100.0 and res["categories"] == {}


@pytest.mark.parametrize("lines, message", [
    ('{"question_id": "0", "text": "A"}\n{"question_id": "1", "text": "A"\n', r"r\.jsonl:2: malformed JSON line"),
    ('{"text": "A"}\n', r"r\.jsonl:1: no 'question_id' field"),
    ('{"question_id": "0", "text": "A"}\n\n{"question_id": "0", "text": "B"}\n', r"r\.jsonl:3: duplicate question_id '0' \(first on line 1\)"),
    ('{"question_id": "0", "prompt": "x"}\n', r"r\.jsonl: answer '0' has no 'text'"),
])
def test_bad_result_file_names_file_and_line(tmp_path, lines, message):
    q = _tiny_question_file(tmp_path)
    r = _write(tmp_path / "r.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        eval_science_qa.main(["--question-file", str(q), "--result-file", str(r)])


def test_bad_question_file(tmp_path):
    q = _write(tmp_path / "q.json", json.dumps([{"id": "1", "conversations": [{"from": "human", "value": "x"}]}]))
    with pytest.raises(ValueError, match=r"q\.json: question #0 needs 'id' and a human \+ gpt conversation"):
        eval_science_qa.load_questions(q)
    q = _write(tmp_path / "q.json", '[{"id": "1",')
    with pytest.raises(ValueError, match=r"q\.json:1: malformed JSON"):
        eval_science_qa.load_questions(q)
