"""Image and prompt helpers with LLaVA's names: tokenizer_image_token, process_images, expand2square.

tokenizer_image_token follows haotian-liu/LLaVA llava/mm_utils.py (Apache-2.0) @c121f04.
"""
import base64
import io
import os
from typing import List, Optional, Sequence, Tuple

import torch
from PIL import Image

from .constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from .image_io import ImageError, open_image


def load_image(path_or_b64: str) -> Image.Image:
    """An image file (or a base64 / data URL string) as RGB through llava_drip.image_io (EXIF, 16-bit,
    alpha over white, pixel limit), naming the file on failure."""
    if path_or_b64.startswith("data:image"):
        try:
            raw = base64.b64decode(path_or_b64.split(",", 1)[1], validate=True)
        except (ValueError, IndexError) as e:
            raise ImageError(f"invalid base64 in data URL {path_or_b64[:40]}...: {e}", "unreadable") from e
        return open_image(raw, name="the data-URL image")
    return open_image(path_or_b64)


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
                          return_tensors: Optional[str] = None):
    """Tokenize a prompt, putting `image_token_index` where each '<image>' stands (LLaVA's rule).

    The text between images is tokenized chunk by chunk. If the first chunk starts with BOS, that BOS
    is kept once and the first token of every later chunk (its own BOS) is dropped; otherwise no
    token is dropped. This matches haotian-liu/LLaVA llava/mm_utils.py, so training labels built from
    these lengths line up with LLaVA's.

    Returns:
        A list of ids, or a LongTensor [T] with return_tensors="pt".
    """
    chunks = [list(tokenizer(chunk).input_ids) for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    skip = 1 if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids: List[int] = chunks[0][:skip]
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(image_token_index)
        ids.extend(chunk[skip:])
    if return_tensors == "pt":
        return torch.tensor(ids, dtype=torch.long)
    if return_tensors is not None:
        raise ValueError(f"unsupported return_tensors {return_tensors!r} (use None or 'pt')")
    return ids


def tokenizer_is_legacy(tokenizer) -> bool:
    """Whether text right after a special token gets SentencePiece's '▁' prefix: LLaVA's `tokenizer.legacy`.

    LLaVA (slow LlamaTokenizer, transformers >= 4.31) reads the flag, and its label counts depend on
    what the flag does: with legacy=False, "USER" after "</s>" has no '▁'. transformers 5 has only the
    fast LlamaTokenizer and builds its pre-tokenizer from the flag (Metaspace prepend_scheme "always"
    for legacy, "first" otherwise), so probing the behaviour gives `tokenizer.legacy` there, and a
    sensible answer for tokenizers without the flag (False for GPT-NeoX, LLaVA's default for mpt).
    """
    eos = tokenizer.eos_token or tokenizer.bos_token
    if not eos:
        return bool(getattr(tokenizer, "legacy", False))
    pieces = tokenizer.tokenize(eos + "a")
    after = pieces[pieces.index(eos) + 1:] if eos in pieces else pieces
    return bool(after) and after[0].startswith("\u2581")


def get_model_name_from_path(model_path: str) -> str:
    parts = os.path.normpath(model_path).split(os.sep)
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]
