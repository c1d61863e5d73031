"""The one way this project reads an image file: training, evaluation, inspection and serving all call
`open_image`, so the same file gives the same pixels on every path.

- the pixel count is checked from the header, before anything is decoded (PIL's bomb guard is set to
  the same limit, which also covers Gradio's own decoding of uploads);
- EXIF orientation is applied (phone photos are stored sideways);
- 16-bit greyscale is scaled to 8 bits (PIL's convert("RGB") clips it to white); float images are
  min-max stretched;
- transparency is composited over white (the colour under alpha 0 is arbitrary);
- images with a side over `max_side` are reduced by an integer factor before anything else sees them.

Errors are `ImageError` (a ValueError) whose message names the source and the problem in one line.
"""
import io
import os
import re
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 64 Mpx: a 48 Mpx phone photo passes; a 12000x12000 PNG (144 Mpx, ~1.3 GB to decode) does not.
DEFAULT_MAX_PIXELS = int(os.environ.get("LLAVA_DRIP_MAX_IMAGE_PIXELS", 64 * 1024 * 1024))
DEFAULT_MAX_SIDE = 4096  # larger images are reduced first: the towers see 224-448 px anyway

Source = Union[str, os.PathLike, bytes, BinaryIO]


class ImageError(ValueError):
    """An image that cannot be used; `kind` is missing | unreadable | too_large."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def set_pixel_limit(max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """PIL's bomb guard (a warning above MAX_IMAGE_PIXELS, a refusal above twice it) at our limit, so
    decoders we do not call ourselves (Gradio's upload handling) stop there too."""
    Image.MAX_IMAGE_PIXELS = max_pixels


set_pixel_limit()


def _name(src: Source, name: Optional[str]) -> str:
    if name:
        return name
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return "the uploaded image"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded PIL image -> RGB, as described in the module docstring."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "I" or arr.max(initial=0) > 255 else 255.0  # 'I' also holds 8-bit data
        arr = np.clip(arr, 0, top) * (255.0 / top)
        img = Image.fromarray(np.round(arr).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(np.round(np.nan_to_num(arr)).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(src: Source, *, name: Optional[str] = None, max_pixels: Optional[int] = None,
               max_side: Optional[int] = DEFAULT_MAX_SIDE) -> Image.Image:
    """Read `src` (a path, bytes or a binary file object) as an RGB image; ImageError names what is wrong."""
    label = _name(src, name)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(src, bytes):
        if not src:
            raise ImageError(f"{label} is empty (0 bytes)", "unreadable")
        src = io.BytesIO(src)
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if not p.exists():
            raise ImageError(f"image not found: {label}", "missing")
        if p.is_dir():
            raise ImageError(f"{label} is a directory, not an image file", "unreadable")
        if p.stat().st_size == 0:
            raise ImageError(f"{label} is empty (0 bytes)", "unreadable")
    try:
        with Image.open(src) as im:
            w, h = im.size  # header only: nothing decoded yet
            if w * h > limit:
                raise ImageError(f"{label} is {w}x{h} = {w * h / 1e6:.0f} Mpx, over the limit of "
                                 f"{limit / 1e6:.0f} Mpx (LLAVA_DRIP_MAX_IMAGE_PIXELS)", "too_large")
            if w == 0 or h == 0:
                raise ImageError(f"{label} has no pixels ({w}x{h})", "unreadable")
            factor = 1
            if max_side and max(w, h) > max_side:
                factor = -(-max(w, h) // max_side)
                if im.format == "JPEG":  # decode at reduced size (DCT scaling), not full size then shrink
                    im.draft(im.mode, (w // factor, h // factor))
            im.load()
            img = to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own guard fires at twice the limit, inside Image.open
        m = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(m.group(1)) / 1e6:.0f} Mpx" if m else "too many pixels"
        raise ImageError(f"{label} is {size}, over the limit of {limit / 1e6:.0f} Mpx "
                         "(LLAVA_DRIP_MAX_IMAGE_PIXELS)", "too_large") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label} is not an image file PIL can read", "unreadable") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated data, bad chunks, unsupported modes
        raise ImageError(f"{label} cannot be decoded ({e})", "unreadable") from e
    if max_side and max(img.size) > max_side:
        factor = -(-max(img.size) // max_side)
        img = img.reduce(factor)
    return img
