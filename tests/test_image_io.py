"""One image reader (llava_drip.image_io) for every path: the same file gives the same pixels in LLaVA training,
contrastive training, evaluation, inspection and serving, and bad files fail in one line that names them."""
import base64
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from llava_drip import image_io
from llava_drip.image_io import ImageError, open_image


def _files(folder: Path) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    base = Image.fromarray(rng.integers(0, 255, (40, 64, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: stored sideways, shown rotated 90 degrees clockwise
    base.save(folder / "sideways.jpg", exif=exif.tobytes(), quality=95)
    out["sideways"] = folder / "sideways.jpg"
    Image.fromarray((rng.integers(0, 65535, (32, 48))).astype(np.uint16)).save(folder / "deep.png")
    out["deep16"] = folder / "deep.png"
    rgba = np.concatenate([rng.integers(0, 255, (30, 30, 3)), rng.integers(0, 2, (30, 30, 1)) * 255], -1)
    Image.fromarray(rgba.astype(np.uint8), "RGBA").save(folder / "alpha.png")
    out["rgba"] = folder / "alpha.png"
    pal = Image.fromarray(rng.integers(0, 4, (20, 20)).astype(np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    pal.save(folder / "palette.png", transparency=3)
    out["palette"] = folder / "palette.png"
    Image.new("LA", (16, 16), (80, 100)).save(folder / "la.png")
    out["la"] = folder / "la.png"
    Image.new("CMYK", (16, 16), (0, 128, 255, 0)).save(folder / "cmyk.jpg")
    out["cmyk"] = folder / "cmyk.jpg"
    Image.fromarray(rng.integers(0, 255, (60, 5000, 3), dtype=np.uint8), "RGB").save(folder / "wide.png")
    out["wide"] = folder / "wide.png"
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("images"))


def test_conversion_rules(files):
    side = open_image(files["sideways"])
    assert side.size == (40, 64)  # EXIF applied: 64x40 stored, 40x64 shown
    deep = np.asarray(open_image(files["deep16"]))
    raw = np.asarray(Image.open(files["deep16"]), dtype=np.float64)
    assert deep.shape == (32, 48, 3) and deep.std() > 30  # not clipped to white as convert("RGB") does
    np.testing.assert_allclose(deep[..., 0], np.round(raw * 255 / 65535), atol=1)
    rgba = np.asarray(Image.open(files["rgba"]))
    got = np.asarray(open_image(files["rgba"]))
    clear = rgba[..., 3] == 0
    assert (got[clear] == 255).all() and (got[~clear] == rgba[~clear][:, :3]).all()  # alpha over white
    pal = np.asarray(open_image(files["palette"]))
    idx = np.asarray(Image.open(files["palette"]))
    assert (pal[idx == 3] == 255).all() and (pal[idx == 0] == [255, 0, 0]).all()
    assert open_image(files["la"]).getpixel((0, 0)) == (186, 186, 186)  # 80 at alpha 100/255 over white: 31 + 155
    assert open_image(files["cmyk"]).mode == "RGB"
    wide = open_image(files["wide"])
    assert max(wide.size) <= image_io.DEFAULT_MAX_SIDE and wide.size == (2500, 30)


def test_same_pixels_through_every_path(files, tmp_path):
    """Training (LLaVA and contrastive), evaluation, inspection and serving read one file identically."""
    import llava_drip.drip as drip
    from llava_drip.clip.data import CheckedCsvDataset
    from llava_drip.clip.zeroshot import image_loader
    from llava_drip.inspect import tokens
    from llava_drip.mm_utils import load_image, process_images
    from llava_drip.model.multimodal_encoder.towers import OpenCLIPImageProcessor
    from llava_drip.serve.api import decode_data_url
    from llava_drip.serve.engine import to_rgb
    from llava_drip.train.data import LazySupervisedDataset

    _, _, preprocess = drip.create_model_and_transforms("DRIP-4x-tiny")
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    proc = OpenCLIPImageProcessor(preprocess, 64, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    ds = LazySupervisedDataset.__new__(LazySupervisedDataset)  # only its image path is exercised here
    ds.image_folder, ds.image_processor, ds.image_aspect_ratio = str(tmp_path), proc, "pad"
    cfg = SimpleNamespace(image_aspect_ratio="pad")
    (tmp_path / "clip.csv").write_text("filepath\ttitle\n" + "".join(f"{p}\tx\n" for p in files.values()))
    csv = CheckedCsvDataset(str(tmp_path / "clip.csv"), preprocess, "filepath", "title",
                            tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long))
    assert csv.bad_rows == []
    for i, (kind, path) in enumerate(files.items()):
        ref = np.asarray(open_image(path))
        url = f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"
        views = {
            "eval (mm_utils.load_image)": load_image(str(path)),
            "inspect (tokens.load_image)": tokens.load_image(path)[0],
            "zero-shot / classify (ImageFolder loader)": image_loader(str(path)),
            "API (data URL -> engine)": to_rgb(decode_data_url(url, "messages[0].content[1].image_url.url")),
            "chat CLI / demo (open_image on the file)": to_rgb(open_image(path.read_bytes(), name=path.name)),
        }
        for where, img in views.items():
            assert np.array_equal(np.asarray(img), ref), (kind, where)
        train = ds.load_image({"image": str(path)})
        evaluated = process_images([load_image(str(path))], proc, cfg)[0]
        assert torch.equal(train, evaluated), kind
        assert torch.equal(csv[i][0], preprocess(open_image(path))), kind


def test_bad_files_fail_in_one_line(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    good = io.BytesIO()
    Image.new("RGB", (300, 300), (1, 2, 3)).save(good, format="PNG")
    (tmp_path / "cut.png").write_bytes(good.getvalue()[:200])
    (tmp_path / "dir.png").mkdir()
    cases = {"missing.png": "missing", "empty.png": "unreadable", "text.png": "unreadable", "cut.png": "unreadable",
             "dir.png": "unreadable"}
    for name, kind in cases.items():
        with pytest.raises(ImageError) as e:
            open_image(tmp_path / name)
        assert e.value.kind == kind and name in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    # over the pixel limit: refused from the header, before decoding (a 12000x12000 PNG is ~140 KB)
    big = io.BytesIO()
    Image.new("L", (12000, 12000)).save(big, format="PNG")
    with pytest.raises(ImageError, match="12000x12000|144 Mpx") as e:
        open_image(big.getvalue(), name="big.png")
    assert e.value.kind == "too_large" and "big.png" in str(e.value)
    with pytest.raises(ImageError, match="over the limit") as e:
        open_image(big.getvalue(), name="big.png", max_pixels=10_000_000)
    assert e.value.kind == "too_large"
