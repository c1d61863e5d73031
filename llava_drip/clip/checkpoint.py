"""open_clip_train's epoch_N.pt -> plain weights for later stages.

open_clip_train's own checkpoints stay as it writes them (resume needs the optimizer state);
`export_weights` turns one into a model.safetensors, written atomically.
"""
import os
from pathlib import Path

from llava_drip.drip.factory import load_state_dict
from llava_drip.utils import atomic_save_tensors


def export_weights(checkpoint, out, model_name: str) -> Path:
    """open_clip_train checkpoint (epoch_N.pt) -> model weights only, as safetensors."""
    sd = load_state_dict(checkpoint)
    return atomic_save_tensors(sd, out, metadata={"model": model_name, "source": os.path.abspath(str(checkpoint))})
