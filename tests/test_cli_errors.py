"""Bad input on the command line gives one line that names the problem and a chosen exit status, never a
traceback: an unusable image for `chat`, unreadable images in an eval run (skipped, counted, not retried on
resume), an unknown model name for `zeroshot` / `classify`, a folder with no images for `tokens`.

Each case runs the command as a subprocess, as a user would. `write_bad_images` is shared with the demo's
browser tests (tests/test_demo_browser.py).
"""
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tiny_model import tiny_llava  # noqa: F401  (fixture)

BAD_KINDS = ("non_image", "empty", "truncated", "huge")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header says side x side (400 Mpx): 100 bytes on disk, ~1.2 GB if anything decoded it."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                     + _png_chunk(b"IDAT", zlib.compress(b"\x00" * (side + 1))) + _png_chunk(b"IEND", b""))
    return path


def write_bad_images(folder: Path) -> dict:
    """kind -> a .png file no one can use: text under an image name, 0 bytes, cut short, 20000x20000."""
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good.png"
    Image.new("RGB", (96, 96), (200, 40, 40)).save(good)
    files = {"non_image": folder / "notes.png", "empty": folder / "empty.png",
             "truncated": folder / "truncated.png", "huge": huge_png(folder / "huge.png")}
    files["non_image"].write_text("these are notes, not an image\n")
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(good.read_bytes()[:120])
    return files


# the words of image_io's message for each kind
NEEDLE = {"non_image": "is not an image file", "empty": "is empty (0 bytes)", "truncated": "cannot be decoded",
          "huge": "over the limit"}


def _run(args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> dict:
    return write_bad_images(tmp_path_factory.mktemp("bad-images"))


@pytest.mark.parametrize("kind", ["huge", "truncated"])  # the other kinds take the same path (image_io)
def test_chat_unusable_image(kind, bad_images, tmp_path):
    # the image is read before the model loads: a model folder is not even needed
    r = _run(["-m", "llava_drip.cli", "chat", "--model-path", str(tmp_path / "no-model"),
              "--image-file", str(bad_images[kind])])
    assert r.returncode == 2
    line = _one_line_error(r)
    assert line.startswith("llava-drip chat: --image-file: ") and str(bad_images[kind]) in line
    assert NEEDLE[kind] in line


def test_model_vqa_skips_unreadable_images_and_resume_does_not_retry(tiny_llava, bad_images, tmp_path):
    good = bad_images["truncated"].parent / "good.png"
    questions = [{"question_id": 1, "image": good.name, "text": "What color is the image?", "category": "conv"},
                 {"question_id": 2, "image": bad_images["truncated"].name, "text": "What is it?", "category": "conv"},
                 {"question_id": 3, "image": bad_images["huge"].name, "text": "Describe it.", "category": "detail"}]
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = tmp_path / "answers.jsonl"
    args = ["-m", "llava_drip.eval.model_vqa", "--model-path", tiny_llava, "--question-file", str(qfile),
            "--image-folder", str(good.parent), "--answers-file", str(answers), "--temperature", "0",
            "--conv-mode", "vicuna_v1", "--max-new-tokens", "4", "--batch-size", "2"]
    r = _run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 answered now, 0 already there" in r.stdout
    assert "SKIPPED 2 questions whose image cannot be read" in r.stdout and str(answers) + ".skipped" in r.stdout
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [row["question_id"] for row in rows] == [1]  # LLaVA's answers file: real answers only
    assert set(rows[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    skipped = [json.loads(line) for line in Path(str(answers) + ".skipped").read_text().splitlines()]
    assert [s["question_id"] for s in skipped] == [2, 3]
    assert "cannot be decoded" in skipped[0]["error"] and "over the limit" in skipped[1]["error"]

    again = _run(args)  # resumed: nothing left to do, the bad questions are not tried (nor die) again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 answered now, 1 already there" in again.stdout and "SKIPPED 2 questions" in again.stdout
    assert len(answers.read_text().splitlines()) == 1


@pytest.mark.parametrize("command,extra", [
    ("zeroshot", ["--data", "folder"]),
    ("classify", ["--train", "folder", "--val", "folder"]),
])
def test_unknown_model_name(command, extra, tmp_path):
    r = _run(["-m", "llava_drip.cli", command, "--model", "DRIP-9x-nope", "--checkpoint", str(tmp_path / "w.pt"),
              *extra])
    assert r.returncode == 2
    line = _one_line_error(r)
    # the wording `llava-drip tokens` and `flops` already use
    assert line.startswith(f"llava-drip {command}: unknown model 'DRIP-9x-nope'. Available: [")
    assert "'DRIP-4x-tiny'" in line


def test_tokens_folder_without_images(tmp_path):
    empty = tmp_path / "photos"
    empty.mkdir()
    r = _run(["-m", "llava_drip.cli", "tokens", "--model", "DRIP-4x-tiny", str(empty)])
    assert r.returncode == 2
    assert _one_line_error(r) == f"llava-drip tokens: no image files found in {empty}"


def test_clip_train_unknown_model_name(tmp_path):
    r = _run(["-m", "llava_drip.cli", "clip-train", "--model", "DRIP-9x-nope", "--train-data", str(tmp_path / "x.csv"),
              "--dataset-type", "csv", "--logs", str(tmp_path), "--device", "cpu"])
    assert r.returncode != 0
    line = _one_line_error(r)
    assert line.startswith("llava-drip clip-train: unknown model 'DRIP-9x-nope'. Available: [")
    assert "'DRIP-4x-tiny'" in line


def test_llava_train_unknown_vision_tower(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    r = _run([str(repo / "llava_drip" / "train" / "train.py"), "--model_name_or_path", str(tmp_path),
              "--vision_tower", "DRIP-9x-nope", "--data_path", str(tmp_path / "d.json"), "--output_dir",
              str(tmp_path / "out"), "--use_cpu", "True", "--report_to", "none"])
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("train.py: error:")]
    assert "Traceback" not in r.stderr and len(err) == 1, r.stderr[-2000:]
    assert "unknown model 'DRIP-9x-nope'. Available: [" in err[0] and "'DRIP-4x-tiny'" in err[0]
