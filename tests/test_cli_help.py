"""`llava-drip <command> --help` for every command: exit 0, the command's usage, and none of torch, open_clip,
transformers, gradio or torchvision imported (they take seconds to load; the parsers need none of them).

Each run is a fresh interpreter, so what it imported is what --help needed. No test here measures time.
"""
import json
import subprocess
import sys

import pytest

from llava_drip.cli import COMMANDS

HEAVY = ("torch", "open_clip", "open_clip_train.main", "transformers", "gradio", "torchvision")

# run the CLI as the entry point does, then report what was imported on the last line of stderr
WRAPPER = """
import json, sys
from llava_drip.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
sys.stdout.flush()
print("\\n" + json.dumps({"rc": rc or 0, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def _help(args):
    r = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stderr.strip().splitlines()[-1])
    return report["rc"], r.stdout, set(report["modules"])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_is_light(command):
    rc, out, modules = _help([*command.split(), "--help"])
    assert rc == 0
    assert out.startswith(f"usage: llava-drip {command} "), out[:300]
    assert not [m for m in HEAVY if m in modules]


def test_clip_train_help_includes_open_clip_train_flags():
    rc, out, modules = _help(["clip-train", "-h"])
    assert rc == 0 and "--drip-loss-weight" in out
    assert "open_clip_train flags (passed through unchanged)" in out and "--train-data" in out
    assert not [m for m in HEAVY if m in modules]


def test_top_level_help():
    rc, out, modules = _help(["--help"])
    assert rc == 0 and out.startswith("usage: llava-drip <command>")
    assert all(name in out for name in COMMANDS)
    assert "torch" not in modules


def test_names_match_the_modules_that_use_them():
    """drip/names.py holds the parsers' choices; the torch-side modules re-export the same objects."""
    from llava_drip.drip import boundary, factory, names
    assert boundary.EVAL_MODES is names.EVAL_MODES
    assert factory.list_models is names.list_models and factory.cli_models is names.cli_models
    assert factory.CONFIG_DIR == names.CONFIG_DIR and "DRIP-4x-tiny" in names.list_models()
