"""`llava-drip synth digits`: sklearn's real 8x8 digits as ImageFolders, and `classify` on them."""
import gzip
import json
import shutil

import pytest
from PIL import Image

from llava_drip.data import digits


@pytest.fixture(scope="module")
def digit_folders(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    assert digits.main(["--csv", str(shared_data / "images" / "sklearn_digits.csv.gz"), "--out", str(out),
                        "--size", "32", "--seed", "1"]) == 0
    return out


def test_converter_writes_stratified_imagefolders(digit_folders):
    meta = json.loads((digit_folders / "meta.json").read_text())
    assert meta["images"] == 1797
    train, val = meta["counts"]["train"], meta["counts"]["val"]
    assert sorted(train) == sorted(val) == [str(d) for d in range(10)]
    assert sum(train.values()) + sum(val.values()) == 1797
    for d in map(str, range(10)):  # each digit split 80/20
        assert abs(val[d] - 0.2 * (train[d] + val[d])) <= 1
        assert len(list((digit_folders / "val" / d).glob("*.png"))) == val[d]
    img = Image.open(next((digit_folders / "train" / "3").glob("*.png")))
    assert img.size == (32, 32) and img.mode == "RGB"
    # nearest upsampling keeps the 8x8 blocks: each 4x4 block is one grey level
    px = img.convert("L").load()
    assert all(px[x, y] == px[x - x % 4, y - y % 4] for x in range(32) for y in range(32))


def test_bad_csv_is_refused_by_line(tmp_path, capsys):
    bad = tmp_path / "bad.csv.gz"
    with gzip.open(bad, "wt") as f:
        f.write(",".join(["0"] * 64 + ["3"]) + "\n" + ",".join(["0"] * 10) + "\n")
    assert digits.main(["--csv", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "line 2: expected 64 pixels and a label, got 10 values" in capsys.readouterr().err


def test_linear_probe_runs_on_digits(digit_folders, tmp_path):
    """The classify path on real data (random tower, 1 epoch, a subset: mechanics, not accuracy)."""
    from llava_drip.classify import train as classify
    from llava_drip.train.tiny_pipeline import save_random_tower
    small = tmp_path / "small"
    for split, n in (("train", 12), ("val", 4)):
        for d in range(10):
            dst = small / split / str(d)
            dst.mkdir(parents=True)
            for f in sorted((digit_folders / split / str(d)).glob("*.png"))[:n]:
                img = Image.open(f).resize((64, 64), Image.NEAREST)  # the tiny towers take 64 px
                img.save(dst / f.name)
    ckpt = save_random_tower("DRIP-4x-tiny", str(tmp_path / "drip.safetensors"))
    out = tmp_path / "probe"
    rc = classify.main(["--mode", "linear", "--model", "DRIP-4x-tiny", "--checkpoint", ckpt, "--train",
                        str(small / "train"), "--val", str(small / "val"), "--epochs", "1", "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_classes"] == 10 and metrics["num_val"] == 40 and 0 <= metrics["top1"] <= 1
