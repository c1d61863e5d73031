"""POPE and MME scorers in LLaVA's formats, and the eval/pope.sh, eval/mme.sh launchers.

The figures come from LLaVA-1.5-13B's published answers in $LLAVA_DRIP_DATA (pope/, mme/; see its
README): POPE F1 84.46 / 86.25 / 87.14 (adversarial / popular / random), mean 85.95 (published
85.9); MME perception 1531.17 (published 1531.3), cognition 295.36. The launchers also run end to
end on the tiny model with synthetic images (the COCO and MME images are not available here),
their data and model swapped in through the variables they document.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from llava_drip.eval import convert_answer_to_mme, eval_mme, eval_pope
from tiny_model import tiny_llava  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
LLAVA_SUFFIX = "\nAnswer the question using a single word or phrase."
POPE_F1 = {"adversarial": 84.46, "popular": 86.25, "random": 87.14}
MME_PERCEPTION, MME_COGNITION = 1531.17, 295.36


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_script(script: Path, cwd: Path, env: dict, *args: str) -> str:
    proc = subprocess.run(["bash", str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{script} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def script_env(**extra) -> dict:
    """The user's shell: this venv's python first on PATH, nothing of ours on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ---------------------------------------------------------------- answer parsing

@pytest.mark.parametrize("text, parsed", [
    ("Yes", "yes"), ("No", "no"), ("no", "no"),
    ("No, there is no cat.", "no"), ("There is not a cat in the image.", "no"),
    ("Yes. There is no dog next to it.", "yes"),  # only the first sentence counts
    ("Not at all", "yes"), ("NO", "yes"), ("", "yes"),  # LLaVA's word list is No / no / not
    ("no\nthere is none", "yes"),  # words are split on single spaces, as in LLaVA
    ("Yes, no doubt", "no"),
])
def test_pope_parsing_is_llavas(text, parsed):
    assert eval_pope.parse_answer(text) == parsed


@pytest.mark.parametrize("pred, parsed", [
    ("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("No.", "no"), ("not sure", "no"),
    ("Church", "other"), ("  yes", "other"), ("", "other"), ("I think yes", "other"),
])
def test_mme_parsing_is_mmes(pred, parsed):
    assert eval_mme.parse_prediction(pred) == parsed


# ---------------------------------------------------------------- LLaVA-1.5-13B's published answers

def test_pope_reproduces_llava15_13b(shared_data, tmp_path, capsys):
    pope = shared_data / "pope"
    out = tmp_path / "result.json"
    assert eval_pope.main(["--annotation-dir", str(pope / "coco"), "--question-file", str(pope / "llava_pope_test.jsonl"),
                           "--result-file", str(pope / "llava-v1.5-13b_answers.jsonl"),
                           "--output-result", str(out), "--strict"]) == 0
    res = json.loads(out.read_text())
    assert {c: round(v["f1"], 2) for c, v in res["categories"].items()} == POPE_F1
    assert round(res["mean_f1"], 2) == 85.95 and round(res["mean_f1"], 1) == 85.9  # the published figure
    assert (res["questions"], res["answered"], res["missing"], res["extra_answers"]) == (8910, 8910, 0, 0)
    adv = res["categories"]["adversarial"]
    assert (adv["TP"], adv["FP"], adv["TN"], adv["FN"]) == (1182, 117, 1383, 318)
    assert round(adv["accuracy"], 2) == 85.50 and round(adv["yes_ratio"], 2) == 43.30
    assert "Mean F1: 85.95" in capsys.readouterr().out


def _llava_positional_f1(pope: Path) -> dict:
    """LLaVA's own pairing, written out: answers of a category in file order zipped with its labels."""
    questions = {q["question_id"]: q for q in read_jsonl(pope / "llava_pope_test.jsonl")}
    answers = read_jsonl(pope / "llava-v1.5-13b_answers.jsonl")
    f1 = {}
    for cat in POPE_F1:
        labels = [r["label"] for r in read_jsonl(pope / "coco" / f"coco_pope_{cat}.json")]
        preds = [eval_pope.parse_answer(a["text"]) for a in answers if questions[a["question_id"]]["category"] == cat]
        f1[cat] = eval_pope.confusion_metrics(preds, labels)["f1"]
    return f1


def test_pope_pairing_matches_llavas_on_published_answers(shared_data):
    pope = shared_data / "pope"
    res = eval_pope.score(eval_pope.load_questions(pope / "llava_pope_test.jsonl"),
                          eval_pope.find_label_files(pope / "coco"),
                          eval_pope.read_jsonl_by_id(pope / "llava-v1.5-13b_answers.jsonl"))
    assert {c: v["f1"] for c, v in res["categories"].items()} == pytest.approx(_llava_positional_f1(pope))


def _check_mme(res: dict):
    assert round(res["perception"], 2) == MME_PERCEPTION and round(res["perception"], 1) == pytest.approx(1531.2)
    assert round(res["cognition"], 2) == MME_COGNITION
    assert res["perception_complete"] and res["cognition_complete"] and res["missing_subtasks"] == []
    assert len(res["subtasks"]) == 14
    assert res["subtasks"]["existence"]["score"] == pytest.approx(185.0)
    assert res["other"] == 11  # artwork answers such as "Church", counted wrong


def test_mme_reproduces_llava15_13b_from_eval_tool_files(shared_data, tmp_path, capsys):
    out = tmp_path / "result.json"
    assert eval_mme.main(["--results_dir", str(shared_data / "mme" / "llava-v1.5-13b"), "--output-result", str(out)]) == 0
    _check_mme(json.loads(out.read_text()))
    assert "== perception: 1531.17" in capsys.readouterr().out


def test_mme_reproduces_llava15_13b_from_answers(shared_data, tmp_path, capsys):
    """The published answers JSONL -> our converter -> the same eval_tool lines and figures.

    The ground truth comes from the eval_tool files (MME's release is not here); they lack two
    landmark questions of LLaVA's file, which the converter skips and counts.
    """
    mme = shared_data / "mme"
    out = tmp_path / "eval_tool" / "answers" / "llava-v1.5-13b"
    assert convert_answer_to_mme.main(["--answers-file", str(mme / "llava-v1.5-13b_answers.jsonl"),
                                       "--gt-dir", str(mme / "llava-v1.5-13b"), "--output-dir", str(out),
                                       "--question-file", str(mme / "llava_mme.jsonl"), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["written"] == 2372 and counts["no_ground_truth"] == 2 and counts["no_answer"] == 0
    assert all("03d5e3bfc958be38" in e for e in counts["no_ground_truth_examples"])
    for ref in sorted((mme / "llava-v1.5-13b").glob("*.txt")):
        # same lines; only landmark's order differs (the reference run listed its images otherwise)
        assert Counter(ref.read_text().splitlines()) == Counter((out / ref.name).read_text().splitlines()), ref.name
    _check_mme(eval_mme.score(out))

    # LLaVA's own call, from the MME folder: --experiment NAME
    (tmp_path / "answers").mkdir()
    shutil.copy(mme / "llava-v1.5-13b_answers.jsonl", tmp_path / "answers" / "exp.jsonl")
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        convert_answer_to_mme.main(["--experiment", "exp", "--gt-dir", str(mme / "llava-v1.5-13b")])
    finally:
        os.chdir(cwd)
    _check_mme(eval_mme.score(tmp_path / "eval_tool" / "answers" / "exp"))


def test_launchers_rescore_published_answers(shared_data, tmp_path):
    """eval/pope.sh and eval/mme.sh with REUSE_ANSWERS=1: no model run, the published figures."""
    pope = tmp_path / "pope"
    (pope / "answers").mkdir(parents=True)
    shutil.copytree(shared_data / "pope" / "coco", pope / "coco")
    shutil.copy(shared_data / "pope" / "llava_pope_test.jsonl", pope)
    shutil.copy(shared_data / "pope" / "llava-v1.5-13b_answers.jsonl", pope / "answers" / "llava-v1.5-13b.jsonl")
    out = run_script(REPO / "eval" / "pope.sh", REPO, script_env(POPE_DIR=pope, REUSE_ANSWERS=1), "no/model/needed",
                     "llava-v1.5-13b")
    assert "Mean F1: 85.95" in out
    res = json.loads((pope / "answers" / "llava-v1.5-13b_result.json").read_text())
    assert {c: round(v["f1"], 2) for c, v in res["categories"].items()} == POPE_F1

    mme = tmp_path / "MME"
    (mme / "answers").mkdir(parents=True)
    shutil.copy(shared_data / "mme" / "llava_mme.jsonl", mme)
    shutil.copy(shared_data / "mme" / "llava-v1.5-13b_answers.jsonl", mme / "answers" / "llava-v1.5-13b.jsonl")
    out = run_script(REPO / "eval" / "mme.sh", REPO, script_env(MME_DIR=mme, REUSE_ANSWERS=1,
                     MME_GT_DIR=shared_data / "mme" / "llava-v1.5-13b"), "no/model/needed", "llava-v1.5-13b")
    assert "SKIPPED 2 answers whose question has no ground truth" in out and "== perception: 1531.17" in out
    _check_mme(json.loads((mme / "answers" / "llava-v1.5-13b_result.json").read_text()))


# ---------------------------------------------------------------- bad input (synthetic files)

def _pope_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two categories, four questions each, ids as LLaVA's (offset per category), labels as POPE's."""
    questions, labels = [], {}
    for offset, cat in ((0, "adversarial"), (10000000, "random")):
        labels[cat] = []
        for i in range(1, 5):
            image, text = f"COCO_val2014_{i:012d}.jpg", f"Is there a thing{i} in the image?"
            questions.append({"question_id": offset + i, "image": image, "text": text + LLAVA_SUFFIX, "category": cat})
            labels[cat].append({"question_id": i, "image": image, "text": text, "label": "yes" if i % 2 else "no"})
    qfile = write_jsonl(tmp_path / "llava_pope_test.jsonl", questions)
    for cat, rows in labels.items():
        write_jsonl(tmp_path / "coco" / f"coco_pope_{cat}.json", rows)
    answers = [{"question_id": q["question_id"], "prompt": q["text"], "text": "Yes" if q["question_id"] % 2 else "No"}
               for q in questions]
    return qfile, tmp_path / "coco", write_jsonl(tmp_path / "answers.jsonl", answers)


def _pope(qfile, coco, answers, *extra):
    return eval_pope.main(["--question-file", str(qfile), "--annotation-dir", str(coco), "--result-file", str(answers),
                           "--json", *extra])


def test_pope_missing_answer_is_counted_and_the_rest_stays_paired(tmp_path, capsys):
    qfile, coco, answers = _pope_files(tmp_path)
    rows = read_jsonl(answers)
    write_jsonl(answers, [r for r in rows if r["question_id"] != 2])  # the first 'no' of adversarial
    assert _pope(qfile, coco, answers) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["missing"] == 1 and res["missing_ids"] == [2]
    adv = res["categories"]["adversarial"]
    # LLaVA would zip the 3 answers with the first 3 labels and count two errors; here all three are right
    assert (adv["answered"], adv["missing"], adv["TP"], adv["TN"], adv["FP"], adv["FN"]) == (3, 1, 2, 1, 0, 0)
    assert adv["f1"] == 100.0 and res["categories"]["random"]["missing"] == 0
    assert _pope(qfile, coco, answers, "--strict") == 1
    assert "--strict: 1 questions have no answer" in capsys.readouterr().err


def test_pope_report_names_missing_and_default_yes(tmp_path, capsys):
    qfile, coco, answers = _pope_files(tmp_path)
    rows = read_jsonl(answers)
    rows[0]["text"] = "Maybe a thing"  # neither yes nor no: LLaVA scores it yes
    write_jsonl(answers, rows[:-1])
    eval_pope.main(["--question-file", str(qfile), "--annotation-dir", str(coco), "--result-file", str(answers)])
    out = capsys.readouterr().out
    assert "WARNING 1 questions have no answer" in out
    assert "1 answers say neither yes nor no in their first sentence (scored yes, as LLaVA does)" in out


def test_pope_unparsable_answer_record(tmp_path):
    qfile, coco, answers = _pope_files(tmp_path)
    rows = read_jsonl(answers)
    del rows[3]["text"]
    write_jsonl(answers, rows)
    with pytest.raises(ValueError, match=r"answers\.jsonl: answer to question_id 4 has no text"):
        _pope(qfile, coco, answers)
    answers.write_text(answers.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"answers\.jsonl:9: malformed JSON"):
        _pope(qfile, coco, answers)


def test_pope_wrong_files(tmp_path):
    qfile, coco, answers = _pope_files(tmp_path)
    # labels of another POPE version (a different order): the pairing check names the file
    labels = read_jsonl(coco / "coco_pope_random.json")
    write_jsonl(coco / "coco_pope_random.json", labels[::-1])
    with pytest.raises(ValueError, match=r"coco_pope_random\.json: label #1 .* is not question 10000001"):
        _pope(qfile, coco, answers)
    write_jsonl(coco / "coco_pope_random.json", labels[:3])
    with pytest.raises(ValueError, match=r"coco_pope_random\.json: 3 labels but .* 4 questions of category 'random'"):
        _pope(qfile, coco, answers)
    write_jsonl(coco / "coco_pope_random.json", [{**r, "label": "maybe"} for r in labels])
    with pytest.raises(ValueError, match=r"coco_pope_random\.json:1: 'label' must be"):
        _pope(qfile, coco, answers)
    write_jsonl(coco / "coco_pope_random.json", labels)
    # answers to another benchmark (MME ids)
    mme_answers = write_jsonl(tmp_path / "mme.jsonl", [{"question_id": "existence/1.jpg", "text": "Yes"}])
    with pytest.raises(ValueError, match=r"mme\.jsonl: none of its 1 answers is to a question of"):
        _pope(qfile, coco, mme_answers)
    # a question file without categories (e.g. LLaVA-Bench's)
    bench_q = write_jsonl(tmp_path / "bench.jsonl", [{"question_id": 1, "text": "Describe."}])
    with pytest.raises(ValueError, match=r"bench\.jsonl:1: no 'category' field"):
        _pope(bench_q, coco, answers)
    with pytest.raises(FileNotFoundError, match="no coco_pope_<category>.json label files"):
        _pope(qfile, tmp_path, answers)  # the folder above coco/


def _mme_file(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    return path


GOOD_PAIRS = [("a.txt", "Is it red? Please answer yes or no.", "Yes", "Yes"),
              ("a.txt", "Is it blue? Please answer yes or no.", "No", "No"),
              ("b.txt", "Is it round? Please answer yes or no.", "Yes", "Yes"),
              ("b.txt", "Is it square? Please answer yes or no.", "No", "Yes")]


def test_mme_subtask_scores_and_unparsable_answer(tmp_path):
    rows = list(GOOD_PAIRS)
    rows[1] = rows[1][:3] + ("Church",)  # neither yes nor no: wrong, counted, left out of precision/recall
    sub = eval_mme.score_subtask(_mme_file(tmp_path / "existence.txt", rows))
    assert (sub["accuracy"], sub["accuracy_plus"], sub["score"], sub["other"]) == (50.0, 0.0, 50.0, 1)
    assert (sub["TP"], sub["FN"], sub["FP"], sub["TN"]) == (2, 0, 1, 0)
    res = eval_mme.score(tmp_path)
    assert res["perception"] == 50.0 and not res["perception_complete"] and len(res["missing_subtasks"]) == 13
    assert "WARNING missing subtask files: count" in eval_mme.format_report(res)


@pytest.mark.parametrize("rows, error", [
    ([GOOD_PAIRS[0], GOOD_PAIRS[2]], r"existence\.txt:1-2: a pair of lines names two images"),
    (GOOD_PAIRS[:3], r"existence\.txt: 3 lines; MME scores questions in pairs"),
    ([GOOD_PAIRS[0], GOOD_PAIRS[1][:2] + ("Maybe", "No")], r"existence\.txt:2: ground truth must be yes or no"),
    ([r[:3] for r in GOOD_PAIRS], r"existence\.txt:1: expected 4 tab-separated fields"),
])
def test_mme_wrong_files(tmp_path, rows, error):
    _mme_file(tmp_path / "existence.txt", rows)
    with pytest.raises(ValueError, match=error):
        eval_mme.score(tmp_path)


def test_mme_results_dir_without_subtasks(tmp_path):
    _mme_file(tmp_path / "notes.txt", GOOD_PAIRS)
    with pytest.raises(FileNotFoundError, match="none of MME's 14 <subtask>.txt files"):
        eval_mme.score(tmp_path)


def _mme_release(root: Path, gt: dict[str, list[tuple[str, str, str]]], images: bool = False) -> Path:
    """MME's release layout: flat subtasks hold <stem>.png + <stem>.txt; artwork & co images/ + questions_answers_YN/."""
    for subtask, rows in gt.items():
        nested = subtask in ("artwork", "celebrity", "landmark", "posters", "scene")
        img_dir = root / subtask / "images" if nested else root / subtask
        qa_dir = root / subtask / "questions_answers_YN" if nested else root / subtask
        img_dir.mkdir(parents=True, exist_ok=True)
        qa_dir.mkdir(parents=True, exist_ok=True)
        by_stem: dict[str, list[str]] = {}
        for stem, question, answer in rows:
            by_stem.setdefault(stem, []).append(f"{question}\t{answer}\n")
        for k, (stem, lines) in enumerate(by_stem.items()):
            (qa_dir / f"{stem}.txt").write_text("".join(lines))
            if images:
                Image.new("RGB", (48 + 8 * k, 40), (40 * k % 255, 120, 200)).save(img_dir / f"{stem}.{'jpg' if nested else 'png'}")
    return root


def _mme_question(subtask: str, stem: str, question: str) -> dict:
    nested = subtask in ("artwork", "celebrity", "landmark", "posters", "scene")
    image = f"{subtask}/images/{stem}.jpg" if nested else f"{subtask}/{stem}.png"
    return {"question_id": image, "image": image, "text": question + LLAVA_SUFFIX, "category": subtask}


def test_mme_unique_ids_for_model_vqa(tmp_path, capsys):
    """llava_mme.jsonl repeats ids; the copy for model_vqa does not, and answers match either way."""
    gt = {"existence": [("1", "Is there a cat? Please answer yes or no.", "Yes"),
                        ("1", "Is there a dog? Please answer yes or no.", "No")]}
    release = _mme_release(tmp_path / "release", gt)
    qfile = write_jsonl(tmp_path / "llava_mme.jsonl", [_mme_question("existence", "1", q.split(" Please")[0])
                                                        for _, q, _ in gt["existence"]])
    unique = tmp_path / "unique.jsonl"
    assert convert_answer_to_mme.main(["--question-file", str(qfile), "--unique-ids-to", str(unique)]) == 0
    assert [q["question_id"] for q in read_jsonl(unique)] == ["existence/1.png#1", "existence/1.png#2"]
    for questions in (read_jsonl(qfile), read_jsonl(unique)):
        answers = write_jsonl(tmp_path / "a.jsonl", [{"question_id": q["question_id"], "prompt": q["text"], "text": "No"}
                                                     for q in questions])
        out = tmp_path / "out"
        convert_answer_to_mme.main(["--answers-file", str(answers), "--data-path", str(release), "--output-dir", str(out),
                                    "--question-file", str(qfile)])
        assert (out / "existence.txt").read_text().splitlines() == [
            "1.txt\tIs there a cat? Please answer yes or no.\tYes\tNo", "1.txt\tIs there a dog? Please answer yes or no.\tNo\tNo"]
        assert eval_mme.score_subtask(out / "existence.txt")["score"] == 50.0
    assert "SKIPPED" not in capsys.readouterr().out


def test_mme_converter_skips_and_wrong_files(tmp_path, capsys):
    gt = {"existence": [("1", "Is there a cat? Please answer yes or no.", "Yes"),
                        ("1", "Is there a dog?  Please answer yes or no.", "No")],  # MME's two-space variant
          "landmark": [("x", "Is this a tower? Please answer yes or no.", "Yes"),
                       ("x", "Is this a bridge? Please answer yes or no.", "No")]}
    release = _mme_release(tmp_path / "MME_Benchmark_release_version", gt)
    questions = [_mme_question(s, stem, q.replace("  Please answer yes or no.", "").replace(" Please answer yes or no.", ""))
                 for s, rows in gt.items() for stem, q, _ in rows]
    questions.append(_mme_question("landmark", "y", "Is this a castle?"))  # no ground truth for it
    qfile = write_jsonl(tmp_path / "llava_mme.jsonl", questions)
    answers = [{"question_id": q["question_id"], "prompt": q["text"], "text": "Yes\tsure"} for q in questions]
    afile = write_jsonl(tmp_path / "answers.jsonl", answers[1:])  # the first question unanswered
    out = tmp_path / "out"
    args = ["--answers-file", str(afile), "--data-path", str(release), "--output-dir", str(out), "--question-file", str(qfile)]
    assert convert_answer_to_mme.main(args) == 0
    report = capsys.readouterr().out
    assert "SKIPPED 1 answers whose question has no ground truth" in report
    assert "SKIPPED 1 questions of" in report and "without an answer" in report
    assert (out / "existence.txt").read_text() == "1.txt\tIs there a dog?  Please answer yes or no.\tNo\tYes sure\n"
    assert (out / "landmark.txt").read_text().splitlines()[0] == "x.txt\tIs this a tower? Please answer yes or no.\tYes\tYes sure"
    with pytest.raises(ValueError, match=r"existence\.txt: 1 lines; MME scores questions in pairs"):
        eval_mme.score(out)  # the unanswered question broke its pair: rejected, not mis-paired

    # wrong files: POPE answers (int ids), a POPE question file, a release folder with a bad qa line
    pope_answers = write_jsonl(tmp_path / "pope.jsonl", [{"question_id": 1, "prompt": "Is there a cat?", "text": "No"}])
    with pytest.raises(ValueError, match=r"pope\.jsonl: question_id 1 is not '<subtask>/<image>'"):
        convert_answer_to_mme.main(["--answers-file", str(pope_answers), "--data-path", str(release), "--output-dir", str(out)])
    no_text = write_jsonl(tmp_path / "no_text.jsonl", [{"question_id": "existence/1.png", "prompt": "Is there a cat?"}])
    with pytest.raises(ValueError, match=r"no_text\.jsonl: answer 'existence/1\.png' has no string 'text'"):
        convert_answer_to_mme.main(["--answers-file", str(no_text), "--data-path", str(release), "--output-dir", str(out)])
    other = write_jsonl(tmp_path / "other.jsonl", [{"question_id": "existence/9.png", "prompt": "Is it?", "text": "No"}])
    with pytest.raises(ValueError, match=r"other\.jsonl: no answer matches a ground-truth question"):
        convert_answer_to_mme.main(["--answers-file", str(other), "--data-path", str(release), "--output-dir", str(out)])
    (release / "existence" / "1.txt").write_text("Is there a cat?\n")
    with pytest.raises(ValueError, match=r"1\.txt:1: expected 'question<TAB>answer'"):
        convert_answer_to_mme.main(args)
    with pytest.raises(FileNotFoundError, match="--data-path .*: not a folder"):
        convert_answer_to_mme.main([*args[:2], "--data-path", str(tmp_path / "nowhere"), *args[4:]])


# ---------------------------------------------------------------- the launchers on the tiny model

POPE_OBJECTS = ("cat", "dog", "car")
MME_SUBTASKS = [t for tasks in eval_mme.EVAL_TYPES.values() for t in tasks]


def _synthetic_pope(root: Path) -> int:
    """llava_pope_test.jsonl, coco/ labels and val2014/ images for 2 images x 3 categories."""
    (root / "val2014").mkdir(parents=True)
    questions, n = [], 0
    for offset, cat in ((0, "adversarial"), (10000000, "random"), (20000000, "popular")):
        labels = []
        for i in range(1, 3):
            image = f"COCO_val2014_{i:012d}.jpg"
            if not (root / "val2014" / image).exists():
                Image.new("RGB", (64, 48 + 16 * i), (200, 60 * i, 30)).save(root / "val2014" / image)
            for j, obj in enumerate(POPE_OBJECTS[:2]):
                n += 1
                k = len(labels) + 1
                text = f"Is there a {obj} in the image?"
                labels.append({"question_id": k, "image": image, "text": text, "label": "yes" if j == 0 else "no"})
                questions.append({"question_id": offset + k, "image": image, "text": text + LLAVA_SUFFIX, "category": cat})
        write_jsonl(root / "coco" / f"coco_pope_{cat}.json", labels)
    write_jsonl(root / "llava_pope_test.jsonl", questions)
    return n


def _synthetic_mme(root: Path) -> int:
    """llava_mme.jsonl and a release folder: one image with two questions in each of the 14 subtasks."""
    gt = {t: [("0001", f"Is this a {t} picture? Please answer yes or no.", "Yes"),
              ("0001", f"Is this a {t} drawing? Please answer yes or no.", "No")] for t in MME_SUBTASKS}
    _mme_release(root / "MME_Benchmark_release_version", gt, images=True)
    questions = [_mme_question(t, stem, q.replace(" Please answer yes or no.", "")) for t, rows in gt.items()
                 for stem, q, _ in rows]
    write_jsonl(root / "llava_mme.jsonl", questions)
    return len(questions)


def test_launchers_answer_with_the_tiny_model(tiny_llava, tmp_path):
    env = script_env(PYTHON=sys.executable)
    model = tmp_path / "tiny-drip"
    shutil.copytree(tiny_llava, model)

    pope = tmp_path / "pope"
    n_pope = _synthetic_pope(pope)
    out = run_script(REPO / "eval" / "pope.sh", tmp_path, {**env, "POPE_DIR": str(pope)}, str(model))
    answers = read_jsonl(pope / "answers" / "tiny-drip.jsonl")
    questions = read_jsonl(pope / "llava_pope_test.jsonl")
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert all(a["model_id"] == "tiny-drip" and a["prompt"] == q["text"] for a, q in zip(answers, questions))
    res = json.loads((pope / "answers" / "tiny-drip_result.json").read_text())
    assert res["questions"] == res["answered"] == n_pope and res["missing"] == 0
    assert set(res["categories"]) == {"adversarial", "popular", "random"}
    for c in res["categories"].values():
        assert c["TP"] + c["FP"] + c["TN"] + c["FN"] == 4
    assert "Mean F1:" in out

    mme = tmp_path / "MME"
    n_mme = _synthetic_mme(mme)
    out = run_script(REPO / "eval" / "mme.sh", tmp_path, {**env, "MME_DIR": str(mme)}, str(model), "drip")
    answers = read_jsonl(mme / "answers" / "drip.jsonl")
    assert len(answers) == n_mme and all(a["model_id"] == "tiny-drip" for a in answers)
    # LLaVA's question file repeats each image's id; model_vqa answered a copy with #1 / #2 appended
    questions = read_jsonl(mme / "llava_mme.jsonl")
    assert [a["question_id"] for a in answers] == [f"{q['question_id']}#{1 + i % 2}" for i, q in enumerate(questions)]
    results_dir = mme / "eval_tool" / "answers" / "drip"
    assert sorted(p.stem for p in results_dir.glob("*.txt")) == sorted(MME_SUBTASKS)
    for t in MME_SUBTASKS:
        lines = (results_dir / f"{t}.txt").read_text().splitlines()
        assert [line.split("\t")[:3] for line in lines] == [
            ["0001.txt", f"Is this a {t} picture? Please answer yes or no.", "Yes"],
            ["0001.txt", f"Is this a {t} drawing? Please answer yes or no.", "No"]]
    res = json.loads((mme / "answers" / "drip_result.json").read_text())
    assert res["questions"] == n_mme and res["perception_complete"] and res["cognition_complete"]
    assert 0 <= res["perception"] <= 2000 and 0 <= res["cognition"] <= 800
    assert res["perception"] == pytest.approx(sum(res["subtasks"][t]["score"] for t in eval_mme.EVAL_TYPES["perception"]))
    assert "== perception:" in out and "== cognition:" in out
