"""`llava-drip chat` as a subprocess: stdin lines in, "ASSISTANT: ..." lines and the token stat out; --budget."""
import os
import re
import subprocess
import sys

import pytest

from tiny_model import tiny_llava  # noqa: F401  (fixture)

from llava_drip.data.shapes import Scene, render, rng_for


def _chat(args, stdin: str = "", timeout: int = 180, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava_drip.cli", "chat", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=env)


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
    assert stats[0].endswith("; budget: model default (mean:0.25)")  # the fixture's calibrated default
    assert [line for line in out if line.startswith("USER: ")] == [
        "USER: What color are the shapes in the image?", "USER: Where are the stars?"]  # blank line skipped
    assert sum(line.startswith("ASSISTANT: ") for line in out) == 2


def test_chat_defaults_to_the_builtin_model(tmp_path):
    """No --model-path: the built-in model shipped in llava_drip/assets/tiny-llava, nothing built."""
    from llava_drip.serve.builtin import SHIPPED
    home = tmp_path / "home"  # an empty cache: the shipped model must not need it
    r = _chat(["--temperature", "0", "--max-new-tokens", "2"], "Hello?\n",
              env=dict(os.environ, LLAVA_DRIP_HOME=str(home)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"no --model-path: using the built-in tiny model {SHIPPED}" in r.stderr
    assert not home.exists()
    out = r.stdout.splitlines()  # stdout stays the conversation
    assert out[0] == "USER: Hello?" and out[1].startswith("ASSISTANT: ") and len(out) == 2


def test_chat_bad_image_fails_before_loading(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    r = _chat(["--model-path", str(tmp_path / "no-model"), "--image-file", str(bad)])
    assert r.returncode == 2 and "llava-drip chat: --image-file: " in r.stderr and str(bad) in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["chat", "serve-api", "demo"])
def test_missing_model_folder_is_a_clear_error(command, tmp_path, capsys):
    from llava_drip import cli
    missing = tmp_path / "no-such-model"
    assert cli.main([command, "--model-path", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"llava-drip {command}: model folder not found: {missing}" in err


def test_chat_budget_flag(tiny_llava, tmp_path):
    image = tmp_path / "shapes.png"
    render(Scene("star", "yellow", "large", "top", 2, "noise"), rng_for(0, 1000, 11), 128).save(image)
    r = _chat(["--model-path", tiny_llava, "--image-file", str(image), "--temperature", "0",
               "--max-new-tokens", "4", "--budget", "0.25"], "What color are the shapes in the image?\n")
    assert r.returncode == 0, r.stderr[-2000:]
    stats = [line for line in r.stdout.splitlines() if "visual tokens" in line]
    assert stats == ["DRIP kept 16 of 64 visual tokens (4.0x fewer); budget: 0.25"]  # exactly round(0.25 * 64)
    assert sum(line.startswith("ASSISTANT: ") for line in r.stdout.splitlines()) == 1


def test_chat_help_lists_the_budget_forms(capsys):
    from llava_drip.serve import cli
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--budget" in text and "ratio 0.25" in text and "count 16" in text and "mean:0.25" in text


@pytest.mark.parametrize("budget,needle", [("abc", "invalid budget 'abc'"), ("1.5", "(0, 1]"), ("0", "whole number"),
                                           ("mean:0", "(0, 1]"), ("mean:lots", "invalid budget")])
def test_chat_bad_budget_fails_at_startup(budget, needle, tmp_path, capsys):
    from llava_drip import cli
    # the model folder does not exist: the budget is checked before anything loads
    assert cli.main(["chat", "--model-path", str(tmp_path / "no-model"), "--budget", budget]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llava-drip chat: --budget: ") and needle in err[0], err


def test_chat_budget_the_model_cannot_serve(tiny_llava, capsys):
    from llava_drip.serve import cli
    assert cli.main(["--model-path", tiny_llava, "--budget", "65"]) == 2  # a count above the 64 patches
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("llava-drip chat: --budget: budget 65 asks for more tokens than the tower's 64 patches; "
                       "use at most 64 (or the ratio 1.0)")
