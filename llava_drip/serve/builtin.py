"""The built-in model: what `llava-drip demo`, `chat` and `serve-api` serve without --model-path.

It is the tiny LLaVA-DRIP of llava_drip/train/tiny_pipeline.py, built on first use (a few minutes on CPU)
into tiny_pipeline.DEFAULT_CACHE/stage2 ($LLAVA_DRIP_HOME, default ~/.cache/llava_drip). It is trained only
on synthetic scenes of coloured shapes, so it answers any image, a real photo too, with talk of shapes.
Nothing heavy is imported here: the commands' --help reads it.
"""
import os
import sys
from typing import Optional, TextIO

BUILTIN_MODEL_ID = "llava-drip-tiny"  # the API's model id for it


def builtin_model_path() -> str:
    from llava_drip.train import tiny_pipeline  # no torch at import
    return os.path.join(tiny_pipeline.DEFAULT_CACHE, "stage2")


def is_builtin(model_path: str) -> bool:
    """Whether `model_path` is the built-in model's folder (given explicitly or not)."""
    return os.path.realpath(os.path.expanduser(model_path)) == os.path.realpath(builtin_model_path())


def model_path_help() -> str:
    return (f"model folder (full, LoRA or projector checkpoint); default: the built-in tiny model in "
            f"{builtin_model_path()}, built there on first use (a few minutes on CPU), trained on synthetic "
            "shape scenes only")


def resolve_model_path(model_path: Optional[str], file: Optional[TextIO] = None) -> str:
    """The given folder, or the built-in tiny model (built on first use); says which on `file` (stdout)."""
    if model_path:
        return model_path
    from llava_drip.train import tiny_pipeline
    file = sys.stdout if file is None else file
    final = builtin_model_path()
    if not os.path.isfile(os.path.join(final, "llava_drip_train.json")):
        print(f"no --model-path: building the built-in tiny model in {tiny_pipeline.DEFAULT_CACHE} "
              "(synthetic data, tiny Llama, stage 1 and 2 on CPU; a few minutes, once)", file=file, flush=True)
    else:
        print(f"no --model-path: using the built-in tiny model {final}", file=file, flush=True)
    return tiny_pipeline.build(tiny_pipeline.DEFAULT_CACHE)
