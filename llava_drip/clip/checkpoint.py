"""Weights we write ourselves: safetensors, atomically (tmp file in the same folder + os.replace).

open_clip_train's own epoch_N.pt files stay as open_clip_train writes them (resume needs the
optimizer state); `export_weights` turns one into a plain model.safetensors for later stages.
"""
import json
import os
from pathlib import Path
from typing import Dict, Optional

import torch

from llava_drip.drip.factory import load_state_dict


def save_safetensors_atomic(tensors: Dict[str, torch.Tensor], path, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write `tensors` to `path` so a reader never sees a half-written file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage: give every tensor its own copy
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(clean, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json_atomic(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def export_weights(checkpoint, out, model_name: str) -> Path:
    """open_clip_train checkpoint (epoch_N.pt) -> model weights only, as safetensors."""
    sd = load_state_dict(checkpoint)
    return save_safetensors_atomic(sd, out, metadata={"model": model_name, "source": os.path.abspath(str(checkpoint))})
