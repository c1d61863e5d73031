"""Synthetic data generators: determinism, file schemas, ImageFolder/classnames agreement."""
import csv
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from llava_drip.cli import main as cli_main
from llava_drip.clip.zeroshot import read_templates
from llava_drip.data import synth_llava
from llava_drip.data.shapes import COLORS, SHAPES

CLIP_ARGS = ["--n", "24", "--val-per-class", "2", "--webdataset", "--shard-size", "10", "--quiet"]
LLAVA_ARGS = ["--n", "40", "--n-sqa", "20", "--n-bench-images", "4", "--quiet"]
SQA_FIELDS = {"question", "choices", "answer", "hint", "image", "task", "grade", "subject", "topic",
              "category", "skill", "lecture", "solution", "split"}


def _clip(out: Path, seed: int) -> Path:
    assert cli_main(["synth", "clip", "--out", str(out), "--seed", str(seed), *CLIP_ARGS]) == 0
    return out


def _llava(out: Path, seed: int) -> Path:
    assert synth_llava.main(["--out", str(out), "--seed", str(seed), *LLAVA_ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_clip")
    return _clip(root / "a", 0), _clip(root / "b", 0), _clip(root / "c", 1)


@pytest.fixture(scope="module")
def llava_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_llava")
    return _llava(root / "a", 0), _llava(root / "b", 0), _llava(root / "c", 1)


def _read_csv(d: Path) -> list[dict]:
    with open(d / "train.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _same_files(a: Path, b: Path, rels) -> bool:
    return all((a / r).read_bytes() == (b / r).read_bytes() for r in rels)


# ---------------------------------------------------------------------------------------------
# synth clip

def test_clip_deterministic(clip_dirs):
    a, b, c = clip_dirs
    # the CSV holds absolute paths, so compare it with the folder prefix removed
    csv_a = (a / "train.csv").read_text().replace(str(a), "")
    assert csv_a == (b / "train.csv").read_text().replace(str(b), "")
    assert csv_a != (c / "train.csv").read_text().replace(str(c), "")
    rels = ["train/images/000000.png", "train/images/000023.png", "val/red_circle/00001.png",
            "train-shards/000000.tar", "train-shards/000002.tar", "classnames.txt", "meta.json"]
    assert _same_files(a, b, rels)
    assert not _same_files(a, c, rels[:2])


def test_clip_csv_schema(clip_dirs):
    d = clip_dirs[0]
    rows = _read_csv(d)
    assert len(rows) == 24 and set(rows[0]) == {"filepath", "title"}
    for r in rows:
        p = Path(r["filepath"])
        assert p.is_absolute() and p.is_file()
        assert r["title"] and "\t" not in r["title"]
    with Image.open(rows[0]["filepath"]) as im:
        assert im.mode == "RGB" and im.size == (64, 64)
    assert len({r["title"] for r in rows}) > 12  # captions vary


def test_clip_val_matches_classnames(clip_dirs):
    d = clip_dirs[0]
    folders = sorted(p.name for p in (d / "val").iterdir() if p.is_dir())  # ImageFolder's order
    classnames = (d / "classnames.txt").read_text().splitlines()
    assert len(folders) == len(classnames) == len(SHAPES) * len(COLORS)
    assert [f.replace("_", " ") for f in folders] == classnames
    assert all(len(list((d / "val" / f).glob("*.png"))) == 2 for f in folders)
    templates = (d / "templates.txt").read_text().splitlines()
    # every count a val image can show has its prompts: singular for one, {plural} for two and three
    assert len(templates) >= 5 and all(("{}" in t) != ("{plural}" in t) for t in templates)
    assert {t.split("{")[0].split()[-1] for t in templates} == {"one", "two", "three"}
    prompts = [t(classnames[0]) for t in read_templates(d / "templates.txt")]
    assert "one black circle." in prompts and "three black circles." in prompts
    meta = json.loads((d / "meta.json").read_text())
    assert meta["classes"] == classnames and meta["counts"] == {"train": 24, "val": 96}


def test_clip_webdataset_pairs(clip_dirs):
    d = clip_dirs[0]
    shards = sorted((d / "train-shards").glob("*.tar"))
    assert [s.name for s in shards] == ["000000.tar", "000001.tar", "000002.tar"]
    titles = {Path(r["filepath"]).stem: r["title"] for r in _read_csv(d)}
    seen = set()
    for s in shards:
        with tarfile.open(s) as tar:
            names = tar.getnames()
            keys = {n.split(".")[0] for n in names}
            assert sorted(names) == sorted([f"{k}.png" for k in keys] + [f"{k}.txt" for k in keys])
            for k in keys:
                assert tar.extractfile(f"{k}.txt").read().decode() == titles[k]
                assert tar.extractfile(f"{k}.png").read() == (d / "train" / "images" / f"{k}.png").read_bytes()
            seen |= keys
    assert seen == set(titles)


# ---------------------------------------------------------------------------------------------
# synth llava

def test_llava_deterministic(llava_dirs):
    a, b, c = llava_dirs
    rels = ["pretrain.json", "finetune.json", "sqa/problems.json", "sqa/pid_splits.json",
            "bench/questions.jsonl", "bench/answers_ref.jsonl", "bench/context.jsonl",
            "images/000000.png", "images/000039.png", "bench/images/001.png", "meta.json"]
    assert _same_files(a, b, rels)
    assert not _same_files(a, c, ["pretrain.json"]) and not _same_files(a, c, ["images/000000.png"])


def _check_conversation(rec: dict, root: Path) -> None:
    assert set(rec) <= {"id", "image", "conversations"} and isinstance(rec["id"], str)
    conv = rec["conversations"]
    assert len(conv) >= 2 and len(conv) % 2 == 0
    assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
    assert all(isinstance(t["value"], str) and t["value"] for t in conv)
    n_tokens = [t["value"].count("<image>") for t in conv]
    if "image" in rec:
        assert (root / rec["image"]).is_file()
        assert conv[0]["value"].startswith("<image>\n") and n_tokens == [1] + [0] * (len(conv) - 1)
    else:
        assert sum(n_tokens) == 0


def test_llava_training_json(llava_dirs):
    d = llava_dirs[0]
    pretrain = json.loads((d / "pretrain.json").read_text())
    finetune = json.loads((d / "finetune.json").read_text())
    assert len(pretrain) == 40
    for rec in pretrain:
        _check_conversation(rec, d)
        assert "image" in rec and len(rec["conversations"]) == 2
    for rec in finetune:
        _check_conversation(rec, d)
    text_only = [r for r in finetune if "image" not in r]
    assert 1 <= len(text_only) <= 0.1 * len(finetune)
    assert any(len(r["conversations"]) > 2 for r in finetune)  # multi-turn
    mc = [r for r in finetune if "Answer with the option's letter" in r["conversations"][0]["value"]]
    assert mc and all(r["conversations"][1]["value"] in "ABCDE" for r in mc)
    assert len({r["id"] for r in finetune}) == len(finetune)


def test_llava_sqa_format(llava_dirs):
    d = llava_dirs[0] / "sqa"
    problems = json.loads((d / "problems.json").read_text())
    splits = json.loads((d / "pid_splits.json").read_text())
    assert splits["test"] == list(problems) and len(problems) == 20
    assert {"train", "val", "test", "minitest"} <= set(splits)
    with_image = 0
    for pid, p in problems.items():
        assert set(p) == SQA_FIELDS and p["split"] == "test"
        assert 2 <= len(p["choices"]) <= 5 and 0 <= p["answer"] < len(p["choices"])
        assert len(set(p["choices"])) == len(p["choices"])
        assert p["subject"] in ("natural science", "social science", "language science")
        assert p["grade"].startswith("grade")
        if p["image"] is not None:
            assert p["image"] == "image.png" and (d / "images" / "test" / pid / "image.png").is_file()
            with_image += 1
    assert 0 < with_image < len(problems)


def test_llava_sqa_converts(llava_dirs):
    # the project's own ScienceQA converter must accept the synthetic problems
    from llava_drip.eval.convert_sqa import convert

    d = llava_dirs[0] / "sqa"
    problems = json.loads((d / "problems.json").read_text())
    records = convert(problems, json.loads((d / "pid_splits.json").read_text())["test"])
    assert len(records) == len(problems)
    for r in records:
        if "image" in r:
            assert (d / "images" / "test" / r["image"]).is_file()


def test_llava_bench_format(llava_dirs):
    d = llava_dirs[0] / "bench"

    def rows(name):
        return [json.loads(line) for line in (d / name).read_text().splitlines()]

    questions, answers, contexts = rows("questions.jsonl"), rows("answers_ref.jsonl"), rows("context.jsonl")
    assert len(questions) == 12 and {q["category"] for q in questions} == {"conv", "detail", "complex"}
    assert all({"question_id", "image", "text", "category"} <= set(q) for q in questions)
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert all({"question_id", "text", "answer_id", "model_id"} <= set(a) for a in answers)
    by_image = {c["image"]: c for c in contexts}
    assert all({"id", "image", "caption"} <= set(c) for c in contexts)
    for q in questions:
        assert q["image"] in by_image and (d / "images" / q["image"]).is_file()


def test_llava_position_qa_adds_one_position_turn(tmp_path):
    """--position-qa 1: every QA record that asks no position question gets one more turn asking where the
    shapes are (in the record's own answer style), drawn after everything else, so the rest is unchanged."""
    synth_llava.main(["--out", str(tmp_path / "a"), "--n", "40", "--n-sqa", "0", "--n-bench-images", "0", "--quiet"])
    synth_llava.main(["--out", str(tmp_path / "b"), "--n", "40", "--n-sqa", "0", "--n-bench-images", "0", "--quiet",
                      "--position-qa", "1"])
    plain = {r["id"]: r for r in json.loads((tmp_path / "a" / "finetune.json").read_text())}
    more = {r["id"]: r for r in json.loads((tmp_path / "b" / "finetune.json").read_text())}
    assert plain.keys() == more.keys()
    added = 0
    for rid, r in plain.items():
        a, b = r["conversations"], more[rid]["conversations"]
        assert b[:len(a)] == a
        asks = [t["value"] for t in a if t["from"] == "human"]
        qa = "image" in r and not asks[0].endswith(synth_llava.MC_SUFFIX) and "(A)" not in asks[0]
        if qa and not any(synth_llava._is_position_question(q) for q in asks):
            q, ans = b[-2]["value"], b[-1]["value"]
            assert len(b) == len(a) + 2 and synth_llava._is_position_question(q)
            short = asks[0].endswith(synth_llava.SHORT_SUFFIX)
            assert q.endswith(synth_llava.SHORT_SUFFIX) == short
            assert (ans in ("left", "right", "top", "bottom", "center")) == short
            added += 1
        else:
            assert b == a
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert added > 10 and meta["counts"]["finetune_extra_position_turns"] == added
    with pytest.raises(SystemExit, match="position-qa"):
        synth_llava.main(["--out", str(tmp_path / "c"), "--n", "2", "--position-qa", "2", "--quiet"])
