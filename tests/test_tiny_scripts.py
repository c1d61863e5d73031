"""scripts/tiny launchers run end to end on CPU at a small size (their own flags; size through env/args)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _env(**extra):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PY=sys.executable, DEEPSPEED=str(VENV_BIN / "deepspeed"),
               PATH=f"{VENV_BIN}:{os.environ['PATH']}", PYTHONPATH=str(REPO))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(cmd, env, log: Path):
    proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=1200)
    log.write_text(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_run_all_both_stages_and_a_chat_turn(tmp_path):
    out = _run(["bash", str(REPO / "scripts" / "tiny" / "run_all.sh")], _env(WORK=tmp_path / "w", N=48, NPROC=1, LM_STEPS=10),
               tmp_path / "run_all.log")
    assert (tmp_path / "w" / "stage1" / "mm_projector.bin").is_file()
    assert (tmp_path / "w" / "stage2" / "model.safetensors").is_file()
    assert "visual tokens" in out  # the chat turn printed DRIP's count


@pytest.mark.slow
def test_clip_repro_small(tmp_path):
    doc = tmp_path / "clip_synthetic.md"
    _run(["bash", str(REPO / "scripts" / "tiny" / "clip_repro.sh"), "--out", str(tmp_path / "runs"), "--doc", str(doc),
          "--plot", str(tmp_path / "clip_synthetic.png"), "--models", "ViT-tiny", "DRIP-4x-tiny", "--n", "64", "--val-per-class", "2", "--epochs", "1",
          "--batch-size", "32", "--reps", "1", "--workers", "0"], _env(), tmp_path / "repro.log")
    text = doc.read_text()
    assert "ViT-tiny" in text and "DRIP-4x-tiny" in text
    summary = json.loads((tmp_path / "clip_synthetic.json").read_text())  # kept beside the doc, not only in runs/
    assert [r["model"] for r in summary["rows"]] == ["ViT-tiny", "DRIP-4x-tiny"]
    assert (tmp_path / "clip_synthetic.png").stat().st_size > 0  # the plot goes where it is told, not into docs/
