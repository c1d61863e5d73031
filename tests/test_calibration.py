"""DRIP's calibrated boundaries and token budgets: the mean hits the target on held-out images while
counts differ per image; fixed budgets are exact; every mode is batch-invariant; old checkpoints load."""
import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

import llava_drip.drip as drip
from llava_drip.clip import calibrate as calib
from llava_drip.clip.zeroshot import load_model_and_transforms
from llava_drip.data import synth_clip
from llava_drip.drip.budget import Budget, parse_budget
from llava_drip.inspect import tokens as tokens_cli

N = 64  # DRIP-4x-tiny: 64 px images, 8 px patches
# a held-out mean ratio over the 288 val scenes: per-image ratios spread ~0.2, so ~3 standard errors
HELD_OUT_TOL = 0.04


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    assert synth_clip.main(["--out", str(out), "--n", "320", "--val-per-class", "6", "--seed", "4", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def tower_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = drip.create_model("DRIP-4x-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "epoch_1.pt"
    # open_clip_train's layout: a dict with 'state_dict' (keys prefixed with 'module.' under DDP)
    sd = {f"module.{k}": v for k, v in model.state_dict().items() if not k.startswith("visual.calib_")}
    torch.save({"epoch": 1, "name": "t", "state_dict": sd}, path)
    return path


def _pixels(folder: Path, preprocess, n=None):
    files = calib.image_files([str(folder)])[:n]
    return torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files])


def _tower(ckpt):
    model, _, preprocess = load_model_and_transforms("DRIP-4x-tiny", str(ckpt))
    return model.visual.eval(), preprocess


@pytest.mark.parametrize("target", [0.1, 0.25, 0.5])
def test_calibration_hits_target_on_held_out_images(scenes, tower_ckpt, tmp_path, target):
    out = tmp_path / "calibrated.pt"
    report = calib.calibrate_checkpoint("DRIP-4x-tiny", str(tower_ckpt), [str(scenes / "train")], target, str(out))
    assert report["calibration"]["mean_ratio"] == pytest.approx(target, abs=0.01)
    tower, preprocess = _tower(out)
    assert tower.is_calibrated and float(tower.calib_target) == pytest.approx(target)
    held_out = _pixels(scenes / "val", preprocess)  # the zero-shot set: no calibration image among them
    counts = [t.shape[0] for t in tower.encode_tokens(held_out)]
    assert sum(counts) / len(counts) / N == pytest.approx(target, abs=HELD_OUT_TOL)
    assert len(set(counts)) > 3, counts  # image-dependent, not a fixed top-k


def test_budgets_exact_and_mean(scenes, tower_ckpt, tmp_path):
    out = tmp_path / "c.pt"
    calib.calibrate_checkpoint("DRIP-4x-tiny", str(tower_ckpt), [str(scenes / "train")], None, str(out))
    tower, preprocess = _tower(out)
    x = _pixels(scenes / "val", preprocess, 24)
    assert {t.shape[0] for t in tower.encode_tokens(x, budget=0.25)} == {16}
    assert {t.shape[0] for t in tower.encode_tokens(x, budget="0.1")} == {6}
    assert {t.shape[0] for t in tower.encode_tokens(x, budget=9)} == {9}
    assert {t.shape[0] for t in tower.encode_tokens(x, budget=1.0)} == {64}
    mean = [t.shape[0] for t in tower.encode_tokens(x, budget="mean:0.5")]
    assert len(set(mean)) > 3 and 20 < sum(mean) / len(mean) < 44
    per_image = tower.encode_tokens(x[:4], budget=[0.1, 16, "mean:0.25", 1.0])
    assert [t.shape[0] for t in per_image[:2]] == [6, 16] and per_image[3].shape[0] == 64
    # the top-k kept under a smaller budget are among those kept under a larger one (nested boundaries)
    z = tower.boundary_logits(x)
    from llava_drip.drip.budget import topk_boundaries
    small, large = topk_boundaries(z, torch.full((24,), 6)), topk_boundaries(z, torch.full((24,), 16))
    assert bool((small <= large).all())


@pytest.mark.parametrize("spec, kind, value", [("0.25", "ratio", 0.25), (0.5, "ratio", 0.5), ("16", "count", 16),
                                               (16, "count", 16), ("mean:0.1", "mean", 0.1), ("none", None, None)])
def test_parse_budget(spec, kind, value):
    b = parse_budget(spec)
    assert (b is None and kind is None) or (b.kind, b.value) == (kind, value)
    if b is not None:
        assert parse_budget(str(b)) == b


@pytest.mark.parametrize("spec", ["0", "1.5", "-3", "mean:2", "mean:x", "lots", "0.0"])
def test_bad_budgets_are_refused(spec):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(spec)


@pytest.mark.parametrize("mode, budget", [("calibrated", None), ("threshold", None), ("topk", None), ("sample", None),
                                          ("calibrated", 0.25), ("calibrated", 11), ("calibrated", "mean:0.3")])
def test_batch_invariance_in_every_mode(scenes, tower_ckpt, tmp_path, mode, budget):
    out = tmp_path / "c.pt"
    calib.calibrate_checkpoint("DRIP-4x-tiny", str(tower_ckpt), [str(scenes / "train")], None, str(out))
    tower, preprocess = _tower(out)
    tower.eval_mode = mode
    x = _pixels(scenes / "val", preprocess, 8)
    together = tower.encode_tokens(x, budget=budget)
    reordered = tower.encode_tokens(x.flip(0), budget=budget)[::-1]
    for i in range(8):
        alone = tower.encode_tokens(x[i:i + 1], budget=budget)[0]
        torch.testing.assert_close(together[i], alone, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reordered[i], alone, rtol=1e-4, atol=1e-5)


def test_checkpoint_without_calibration_loads_and_says_so(tower_ckpt, scenes, caplog):
    model = drip.create_model("DRIP-4x-tiny")
    with caplog.at_level(logging.INFO):
        drip.load_checkpoint(model, tower_ckpt, strict=True)  # no calib_* keys: still a strict load
    assert "without calibration" in caplog.text and "'threshold'" in caplog.text
    tower = model.visual.eval()
    assert not tower.is_calibrated and tower.eval_mode == "calibrated"
    preprocess = drip.create_model_and_transforms("DRIP-4x-tiny")[2]
    x = _pixels(scenes / "val", preprocess, 6)
    fallback = tower.forward_features(x).boundaries
    tower.eval_mode = "threshold"
    torch.testing.assert_close(fallback, tower.forward_features(x).boundaries)
    with pytest.raises(ValueError, match="not calibrated"):
        tower.encode_tokens(x, budget="mean:0.25")


def test_calibrate_cli_in_place_and_safetensors(scenes, tower_ckpt, tmp_path, capsys):
    pt = tmp_path / "epoch_1.pt"
    pt.write_bytes(tower_ckpt.read_bytes())
    report = tmp_path / "report.json"
    rc = calib.main([str(scenes / "train"), "--model", "DRIP-4x-tiny", "--checkpoint", str(pt),
                     "--eval", str(scenes / "val"), "--json", str(report)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "calibrated DRIP-4x-tiny to a mean of 0.2500" in text and "held-out images:" in text
    r = json.loads(report.read_text())
    assert r["eval"]["images"] == len(calib.image_files([str(scenes / "val")]))
    assert r["eval"]["mean_ratio"] == pytest.approx(0.25, abs=HELD_OUT_TOL) and sum(r["eval"]["hist"]) == r["eval"]["images"]
    saved = torch.load(pt, weights_only=True)
    assert saved["epoch"] == 1 and "module.visual.calib_quantiles" in saved["state_dict"]  # the rest untouched
    # a safetensors export written elsewhere, target given
    from llava_drip.clip.checkpoint import export_weights
    st = export_weights(tower_ckpt, tmp_path / "w.safetensors", "DRIP-4x-tiny")
    assert calib.main([str(scenes / "train"), "--model", "DRIP-4x-tiny", "--checkpoint", str(st),
                       "--target", "0.1", "--out", str(tmp_path / "w10.safetensors")]) == 0
    tower, _ = _tower(tmp_path / "w10.safetensors")
    assert tower.is_calibrated and float(tower.calib_target) == pytest.approx(0.1)
    assert calib.main([str(scenes / "train"), "--model", "ViT-tiny", "--checkpoint", str(pt)]) == 2


def test_tokens_cli_budget(scenes, tower_ckpt, tmp_path, capsys):
    out = tmp_path / "c.pt"
    calib.calibrate_checkpoint("DRIP-4x-tiny", str(tower_ckpt), [str(scenes / "train")], None, str(out))
    args = [str(scenes / "val"), "--model", "DRIP-4x-tiny", "--checkpoint", str(out), "--json", "--no-progress"]
    assert tokens_cli.main(args) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert len({r["visual_tokens"] for r in rows}) > 3 and all(r["budget"] is None for r in rows)
    assert tokens_cli.main(args + ["--budget", "0.25"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert {r["visual_tokens"] for r in rows} == {16} and {r["budget"] for r in rows} == {"0.25"}
    assert tokens_cli.main(args + ["--budget", "2.5"]) == 2


def test_counts_on_real_photos(shared_data, scenes, tower_ckpt, tmp_path):
    """Real photos of mixed sizes and modes: the calibrated cut still gives each its own count."""
    out = tmp_path / "c.pt"
    calib.calibrate_checkpoint("DRIP-4x-tiny", str(tower_ckpt), [str(scenes / "train")], None, str(out))
    tower, preprocess = _tower(out)
    skipped = []
    counts = calib.token_counts(tower, calib.image_files([str(shared_data / "images")]), preprocess, skipped=skipped)
    assert len(counts) >= 15 and not skipped
    d = calib.count_distribution(counts, N)
    assert d["distinct"] > 3 and 0 < d["min"] < d["max"] <= N


def test_budget_text_round_trips_every_kind():
    for b in (Budget("ratio", 1.0), Budget("ratio", 0.25), Budget("count", 1), Budget("count", 64),
              Budget("mean", 1.0), Budget("mean", 0.1)):
        assert parse_budget(str(b)) == b, str(b)
    assert str(Budget("ratio", 1.0)) == "1.0" and str(Budget("count", 1)) == "1"
