"""`llava-drip tokens` on real photos: JSON lines, boundary maps of the right size, bad files reported."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from llava_drip.inspect import tokens


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_real_images_json_and_maps(shared_data, tmp_path, capsys):
    folder = shared_data / "images"
    rc = tokens.main(["--model", "DRIP-4x-32", str(folder), "--viz", str(tmp_path / "maps"), "--json",
                      "--viz-size", "336"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = _json_lines(captured.out)
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    assert sorted(r["path"] for r in rows) == sorted(map(str, images))
    assert "non-image file(s) in folders skipped" in captured.err
    modes = set()
    for r in rows:
        assert "error" not in r
        assert r["patch_tokens"] == 49
        assert 1 <= r["visual_tokens"] <= 49
        assert r["ratio"] == pytest.approx(r["visual_tokens"] / 49)
        with Image.open(r["viz"]) as im:
            assert im.format == "PNG" and im.size == (336, 336) and im.mode == "RGB"
        modes.add(r["mode"])
    assert {"RGB", "L", "RGBA"} <= modes  # grey and transparent photos are in the set


def test_count_is_what_the_llm_receives(shared_data):
    counter = tokens.TokenCounter("DRIP-4x-tiny")
    folder = shared_data / "images"
    path = folder / "skimage_coffee.png"
    img, _ = tokens.load_image(path)
    x = counter.preprocess(img)[None]
    with torch.no_grad():
        llm_tokens = counter.tower.encode_tokens(x)[0]
    assert counter.count(x)[0]["visual_tokens"] == llm_tokens.shape[0]


def test_unreadable_file_is_reported_and_run_goes_on(shared_data, tmp_path, capsys):
    good = tmp_path / "good.jpg"
    shutil.copy(shared_data / "images" / "sklearn_flower.jpg", good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((shared_data / "images" / "skimage_horse.png").read_bytes()[:200])
    missing = tmp_path / "missing.png"
    rc = tokens.main(["--model", "DRIP-4x-tiny", str(bad), str(good), str(missing), str(truncated), "--json"])
    captured = capsys.readouterr()
    assert rc == 1
    rows = _json_lines(captured.out)
    assert [r["path"] for r in rows if "error" not in r] == [str(good)]
    failed = {r["path"] for r in rows if "error" in r}
    assert failed == {str(bad), str(missing), str(truncated)}
    for p in (bad, missing, truncated):
        assert str(p) in captured.err


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1", "I;16", "CMYK", "LA", "F"])
def test_any_mode_becomes_rgb(mode):
    arr = (np.arange(40 * 30) % 251).reshape(30, 40).astype(np.uint8)
    img = Image.fromarray(arr, "L").convert(mode) if mode not in ("I;16", "F") else \
        Image.fromarray((arr.astype(np.uint16) * 200) if mode == "I;16" else arr.astype(np.float32) / 7.0, mode)
    out = tokens.to_rgb(img)
    assert out.mode == "RGB" and out.size == (40, 30)
    px = np.asarray(out)
    if mode == "I;16":  # scaled from the 16-bit range (llava_drip.image_io), not clipped to white
        assert px.max() == round(250 * 200 * 255 / 65535) and px.min() == 0
    if mode == "F":  # float: stretched to the full 8-bit range
        assert px.max() == 255 and px.min() == 0


def test_folder_without_images_is_reported(tmp_path, capsys):
    """A folder is searched; one with no image in it is named (exit 1), not dropped in silence."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("text")
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 48), (30, 120, 200)).save(good)
    rc = tokens.main(["--model", "DRIP-4x-tiny", str(empty), str(tmp_path / "notes"), str(good), "--json",
                      "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 1
    rows = _json_lines(captured.out)
    assert [r["path"] for r in rows if "error" not in r] == [str(good)]
    assert {r["path"] for r in rows if "error" in r} == {str(empty), str(tmp_path / "notes")}
    assert f"error: {empty}: a folder with no image files" in captured.err
    assert "2 folder(s) with no image files" in captured.err.splitlines()[-1]


def test_folder_with_modes_and_vit_baseline(tmp_path, capsys):
    for i, mode in enumerate(["L", "RGBA", "P", "1"]):
        Image.new(mode, (50 + 7 * i, 40), 1).save(tmp_path / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    rc = tokens.main(["--model", "ViT-tiny", str(tmp_path), "--json", "--viz", str(tmp_path / "out")])
    assert rc == 0
    rows = _json_lines(capsys.readouterr().out)
    assert len(rows) == 4
    assert all(r["visual_tokens"] == r["patch_tokens"] == 64 and r["ratio"] == 1.0 for r in rows)
    assert all(Image.open(r["viz"]).size == (448, 448) for r in rows)


def test_boundary_map_marks_dropped_tokens():
    crop = Image.new("RGB", (64, 64), (128, 128, 128))
    seg = np.array([0] * 20 + [1] * 30 + [-1] * 14)
    img = tokens.draw_boundary_map(crop, seg, (8, 8), size=200)
    assert img.size == (200, 200)
    px = np.asarray(img)
    assert px[190, 190].max() < 100  # dropped tail drawn dark
