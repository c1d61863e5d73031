"""The built-in model ships in the repository: its files match the manifest, it loads, and it answers the
demo's examples right. The build script itself runs at a small size (slow)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_drip.serve import builtin
from llava_drip.train import builtin_model

REPO = Path(__file__).resolve().parents[1]


def test_shipped_files_match_the_manifest():
    manifest = builtin_model.verify(builtin_model.SHIPPED)
    assert set(manifest["files"]) == set(builtin_model.FILES)
    assert manifest["name"] == builtin.BUILTIN_MODEL_ID
    assert manifest["recipe"]["tower"]["model"] == "DRIP-4x-tiny"
    assert "clip-train" in manifest["recipe"]["tower"]["command"]
    cfg = json.loads((builtin_model.SHIPPED / "config.json").read_text())
    assert "/" not in cfg["mm_vision_tower_pretrained"]  # no path of the machine it was built on
    assert os.path.getsize(builtin_model.SHIPPED / "model.safetensors") < 20 * 2 ** 20


def test_verify_names_a_changed_file(tmp_path):
    copy = tmp_path / "tiny-llava"
    shutil.copytree(builtin_model.SHIPPED, copy)
    with open(copy / "tokenizer.json", "ab") as f:
        f.write(b" ")
    with pytest.raises(ValueError, match="tokenizer.json"):
        builtin_model.verify(copy)
    (copy / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        builtin_model.verify(copy)


def test_no_model_path_means_the_shipped_model(capsys):
    assert builtin.builtin_model_path() == builtin.SHIPPED
    assert builtin.resolve_model_path(None) == builtin.SHIPPED  # nothing is built
    assert "using the built-in tiny model" in capsys.readouterr().out
    assert builtin.is_builtin(str(builtin_model.SHIPPED) + "/")


@pytest.fixture(scope="module")
def shipped_engine():
    from llava_drip.serve.engine import ChatEngine
    return ChatEngine(builtin.SHIPPED, device="cpu")


def test_shipped_model_answers_the_demo_examples(shipped_engine, tmp_path):
    from PIL import Image

    from llava_drip.serve.demo import EXAMPLES, example_images
    shown = example_images(str(tmp_path), photos=False)
    assert len(shown) == len(EXAMPLES)
    for (path, question), (_, _, expected) in zip(shown, EXAMPLES):
        text, stats = shipped_engine.chat([{"role": "user", "content": question}], Image.open(path),
                                          temperature=0.0, max_new_tokens=24)
        assert expected in text.lower(), (question, text)
        assert 0 < stats.visual_tokens_out < 64  # DRIP pooled the 64 patches


@pytest.mark.slow
def test_build_builtin_script_small(tmp_path):
    """scripts/tiny/build_builtin.sh end to end at a tiny size: tower, both stages, shipped folder, eval doc."""
    dest, doc = tmp_path / "ship", tmp_path / "builtin_model.md"
    env = {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "BUILD_ARGS": f"--work {tmp_path / 'work'} --dest {dest} --clip-out {tmp_path / 'clip'} --n 48 "
                         "--stage2-epochs 1 --lm-steps 5",
           "CLIP_ARGS": "--n 64 --epochs 1 --batch-size 32 --val-per-class 1 --workers 0",
           "EVAL_ARGS": f"--model {dest} --out {tmp_path / 'eval'} --n 3 --doc {doc}"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "tiny" / "build_builtin.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = builtin_model.verify(dest)
    assert "--epochs 1" in manifest["recipe"]["tower"]["command"]
    result = json.loads(doc.with_suffix(".json").read_text())
    assert list(result["by_kind"]) == ["colour", "shape", "count", "position"]
    assert result["n"] == 12 and all(v["n"] == 3 for v in result["by_kind"].values())
    assert "| colour |" in doc.read_text()


@pytest.mark.slow
def test_rebuild_from_the_shipped_tower_training_it_in_stage2(tmp_path):
    """build --tower-from (no clip-train run: the shipped model's tower, with its recipe carried over) and
    --tower-lr (stage 2 trains the tower too): the new model's tower differs from the shipped one, outside
    the frozen boundary predictor."""
    from safetensors.torch import load_file
    dest = tmp_path / "ship"
    builtin_model.main(["build", "--work", str(tmp_path / "work"), "--dest", str(dest), "--n", "48",
                        "--stage1-epochs", "1", "--stage2-epochs", "1", "--lm-steps", "5",
                        "--tower-from", str(builtin_model.SHIPPED), "--tower-lr", "1e-3"])
    manifest, shipped = builtin_model.verify(dest), builtin_model.verify(builtin_model.SHIPPED)
    tower = manifest["recipe"]["tower"]
    assert tower["command"] == shipped["recipe"]["tower"]["command"]
    assert tower["taken_from"]["model"] == shipped["files"]["model.safetensors"]["sha256"]
    assert manifest["recipe"]["llava"]["stage2_tower_lr"] == 1e-3
    pre = "model.vision_tower.vision_tower."
    old, new = (load_file(str(d / "model.safetensors")) for d in (builtin_model.SHIPPED, dest))
    keys = [k for k in old if k.startswith(pre)]
    assert keys and set(keys) <= set(new)
    changed = {k[len(pre):] for k in keys if not torch.equal(old[k], new[k])}
    assert any(k.startswith("pre_blocks.") for k in changed) and any(k.startswith("post_blocks.") for k in changed)
    assert not any(k.startswith("boundary_predictor.") for k in changed)


@pytest.mark.parametrize("answer,kind,named", [
    ("The stars are blue.", "colour", {"blue"}), ("Red or blue.", "colour", {"red", "blue"}),
    ("They are hexagons.", "shape", {"hexagon"}), ("It is a cross.", "shape", {"cross"}),
    ("There are three red stars in the image.", "count", {3}), ("2", "count", {2}),
    ("The circle is in the middle of the image.", "position", {"center"}),
    ("The stars are on the left side of the image.", "position", {"left"}), ("Hello.", "shape", set()),
])
def test_answers_are_parsed_for_what_they_name(answer, kind, named):
    assert builtin_model._named(answer, kind) == named


def test_heldout_questions_are_new_scenes_in_training_phrasing():
    from llava_drip.data import synth_llava
    qs = builtin_model.heldout_questions(5)
    assert [q[0] for q in qs] == [k for k in builtin_model.KINDS for _ in range(5)]
    train_questions = set()
    for i in range(300):  # the phrasings stage 2 trains on
        rng = synth_llava.rng_for(0, synth_llava.STREAM_TRAIN, i)
        s = synth_llava.sample_scene(rng)
        for fn in (synth_llava.qa_color, synth_llava.qa_shape, synth_llava.qa_count, synth_llava.qa_position):
            train_questions.add(fn(s, rng)[0])
    assert all(q[3] in train_questions for q in qs)


def test_engine_serves_in_bfloat16(tmp_path):
    """--dtype bfloat16 (the default on CUDA): the weights load in bf16 and the demo's first example is
    answered right, keeping about as many DRIP tokens as in fp32 (a boundary logit at the cut may flip)."""
    import torch
    from PIL import Image

    from llava_drip.serve.demo import EXAMPLES, example_images
    from llava_drip.serve.engine import ChatEngine
    (path, question), (_, _, expected) = example_images(str(tmp_path), photos=False)[0], EXAMPLES[0]
    image = Image.open(path)
    counts = {}
    for dtype in ("float32", "bfloat16"):
        engine = ChatEngine(builtin.SHIPPED, device="cpu", dtype=dtype)
        try:
            assert {p.dtype for p in engine.model.parameters()} == {getattr(torch, dtype)}
            text, stats = engine.chat([{"role": "user", "content": question}], image, temperature=0,
                                      max_new_tokens=32)
            assert expected.lower() in text.lower(), (dtype, text)
            counts[dtype] = stats.visual_tokens_out
        finally:
            engine.close()
    assert 0 < counts["float32"] < 64 and abs(counts["bfloat16"] - counts["float32"]) <= 1, counts
    with pytest.raises(ValueError, match="float64"):
        ChatEngine(builtin.SHIPPED, device="cpu", dtype="float64")
