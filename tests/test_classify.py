"""`llava-drip classify`: linear probe and finetune on small synthetic ImageFolders."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llava_drip.drip as drip
from llava_drip.classify import train as classify
from llava_drip.utils import atomic_save_tensors
from llava_drip.data import synth_clip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    # train and val come from different seeds: disjoint images of the same 48 classes
    for name, seed, per_class in (("a", 1, 4), ("b", 2, 2)):
        assert synth_clip.main(["--out", str(root / name), "--n", "1", "--val-per-class", str(per_class),
                                "--seed", str(seed), "--quiet"]) == 0
    torch.manual_seed(0)
    weights = atomic_save_tensors(drip.create_model("DRIP-4x-tiny").state_dict(), root / "init.safetensors")
    return root / "a" / "val", root / "b" / "val", weights


def test_linear_probe_learns_and_writes_head(folders, tmp_path, capsys):
    train, val, weights = folders
    out = tmp_path / "lin"
    # a random tower's features do not generalise from 4 images per class, but a working probe
    # must fit them: scored on its own training folder it is far above chance (1/48)
    rc = classify.main(["--model", "DRIP-4x-tiny", "--checkpoint", str(weights), "--train", str(train),
                        "--val", str(train), "--mode", "linear", "--epochs", "30", "--lr", "1e-2",
                        "--out", str(out), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["num_classes"] == 48 and res["num_val"] == 192
    assert res["top1"] > 0.3 and res["top5"] >= res["top1"]
    assert res["history"][-1]["train_loss"] < res["history"][0]["train_loss"]
    head = load_file(str(out / "head.safetensors"))
    assert {"head.fc.weight", "head.fc.bias", "head.norm.running_mean", "head.norm.running_var"} <= set(head)
    assert head["head.fc.weight"].shape == (48, 128)
    assert json.loads((out / "metrics.json").read_text())["top1"] == res["top1"]


def test_finetune_writes_tower_and_head(folders, tmp_path, capsys):
    train, val, weights = folders
    out = tmp_path / "ft"
    rc = classify.main(["--model", "DRIP-4x-tiny", "--checkpoint", str(weights), "--train", str(train),
                        "--val", str(val), "--mode", "finetune", "--epochs", "1", "--batch-size", "32",
                        "--out", str(out)])
    assert rc == 0
    assert "finetune DRIP-4x-tiny: top-1" in capsys.readouterr().out
    sd = load_file(str(out / "model.safetensors"))
    tower = drip.create_model("DRIP-4x-tiny").visual
    tower.load_state_dict({k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}, strict=True)
    assert "head.fc.weight" in sd


def test_mismatched_class_folders_are_refused(folders, tmp_path, capsys):
    train, _, weights = folders
    val = tmp_path / "val"
    for c in sorted(p.name for p in Path(train).iterdir())[:3]:
        (val / c).mkdir(parents=True)
        src = next((Path(train) / c).iterdir())
        (val / c / src.name).write_bytes(src.read_bytes())
    rc = classify.main(["--model", "DRIP-4x-tiny", "--checkpoint", str(weights), "--train", str(train),
                        "--val", str(val), "--epochs", "1"])
    assert rc == 2
    assert "class folders differ" in capsys.readouterr().err
