"""Image and prompt helpers with LLaVA's names: tokenizer_image_token, process_images, expand2square."""
import base64
import io
import os
from typing import List, Optional, Sequence, Tuple

import torch
from PIL import Image

from .constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX


def load_image(path_or_b64: str) -> Image.Image:
    """Open an image file (or a base64 / data URL string) as RGB, naming the file on failure."""
    try:
        if path_or_b64.startswith("data:image"):
            path_or_b64 = path_or_b64.split(",", 1)[1]
            return Image.open(io.BytesIO(base64.b64decode(path_or_b64))).convert("RGB")
        with Image.open(path_or_b64) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path_or_b64}") from None
    except Exception as e:  # PIL raises several types for corrupt files
        raise ValueError(f"cannot read image {path_or_b64[:200]}: {e}") from e


def expand2square(img: Image.Image, background: Tuple[int, int, int]) -> Image.Image:
    """Pad to a square with the background colour, image centred (LLaVA's 'pad' aspect mode)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def process_images(images: Sequence[Image.Image], image_processor, model_cfg=None) -> torch.Tensor:
    """PIL images -> [B, 3, H, W] tensor, padding to square first when image_aspect_ratio == 'pad'."""
    aspect = getattr(model_cfg, "image_aspect_ratio", None) or "square"
    if aspect not in ("pad", "square", "resize"):
        raise ValueError(f"unsupported image_aspect_ratio {aspect!r} (use 'pad' or 'square')")
    out = []
    for img in images:
        img = img.convert("RGB")
        if aspect == "pad":
            img = expand2square(img, tuple(int(x * 255) for x in image_processor.image_mean))
        out.append(image_processor.preprocess(img, return_tensors="pt")["pixel_values"][0])
    return torch.stack(out)


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX,
                          return_tensors: Optional[str] = None, return_offsets: bool = False):
    """Tokenize a prompt, putting `image_token_index` where each '<image>' stands.

    Chunks between images are tokenized separately (as LLaVA does) and only the first keeps BOS.
    With return_offsets, also returns each token's (start, end) character span in `prompt`
    ((-1, -1) for the image sentinel), used to build training labels without length arithmetic.
    """
    ids: List[int] = []
    offsets: List[Tuple[int, int]] = []
    pos = 0
    for i, chunk in enumerate(prompt.split(DEFAULT_IMAGE_TOKEN)):
        if i > 0:
            ids.append(image_token_index)
            offsets.append((-1, -1))
            pos += len(DEFAULT_IMAGE_TOKEN)
        enc = tokenizer(chunk, return_offsets_mapping=return_offsets)
        chunk_ids = list(enc["input_ids"])
        chunk_offsets = list(enc["offset_mapping"]) if return_offsets else [(0, 0)] * len(chunk_ids)
        if i > 0 and chunk_ids and chunk_ids[0] == tokenizer.bos_token_id:
            chunk_ids, chunk_offsets = chunk_ids[1:], chunk_offsets[1:]
        ids.extend(chunk_ids)
        offsets.extend((s + pos, e + pos) for s, e in chunk_offsets)
        pos += len(chunk)
    if return_tensors == "pt":
        ids = torch.tensor(ids, dtype=torch.long)
    elif return_tensors is not None:
        raise ValueError(f"unsupported return_tensors {return_tensors!r}")
    return (ids, offsets) if return_offsets else ids


def get_model_name_from_path(model_path: str) -> str:
    parts = os.path.normpath(model_path).split(os.sep)
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]
