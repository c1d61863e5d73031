"""`llava-drip chat` as a subprocess: stdin lines in, "ASSISTANT: ..." lines and the token stat out."""
import re
import subprocess
import sys

import pytest

from tiny_model import tiny_llava  # noqa: F401  (fixture)

from llava_drip.data.shapes import Scene, render, rng_for


def _chat(args, stdin: str = "", timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava_drip.cli", "chat", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def test_chat_with_image_two_turns(tiny_llava, tmp_path):
    image = tmp_path / "shapes.png"
    render(Scene("star", "yellow", "large", "top", 2, "noise"), rng_for(0, 1000, 11), 128).convert("RGBA").save(image)
    stdin = "What color are the shapes in the image?\n\nWhere are the stars?\n"
    r = _chat(["--model-path", tiny_llava, "--image-file", str(image), "--temperature", "0",
               "--max-new-tokens", "12"], stdin)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout.splitlines()
    stats = [line for line in out if "visual tokens" in line]
    assert len(stats) == 1  # printed once, before the chat
    kept, total = map(int, re.search(r"DRIP kept (\d+) of (\d+) visual tokens", stats[0]).groups())
    assert 1 <= kept <= total
    assert [line for line in out if line.startswith("USER: ")] == [
        "USER: What color are the shapes in the image?", "USER: Where are the stars?"]  # blank line skipped
    assert sum(line.startswith("ASSISTANT: ") for line in out) == 2


def test_chat_bad_image_fails_before_loading(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    r = _chat(["--model-path", str(tmp_path / "no-model"), "--image-file", str(bad)])
    assert r.returncode == 2 and "cannot read image" in r.stderr and str(bad) in r.stderr


@pytest.mark.parametrize("command", ["chat", "serve-api", "demo"])
def test_missing_model_folder_is_a_clear_error(command, tmp_path, capsys):
    from llava_drip import cli
    missing = tmp_path / "no-such-model"
    assert cli.main([command, "--model-path", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"llava-drip {command}: model folder not found: {missing}" in err
