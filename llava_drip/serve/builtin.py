"""The built-in model: what `llava-drip demo`, `chat` and `serve-api` serve without --model-path.

It ships in the repository (llava_drip/assets/tiny-llava, a few MB, made by scripts/tiny/build_builtin.sh,
with a MANIFEST.json of how and its checksums), so nothing is trained at start-up. It is a tiny LLaVA-DRIP
trained only on synthetic scenes of coloured shapes: it answers any image, a real photo too, with talk of
shapes. If the shipped folder is missing (a checkout without it), the tiny pipeline builds a stand-in into
$LLAVA_DRIP_HOME (default ~/.cache/llava_drip) on first use instead. Nothing heavy is imported here: the
commands' --help reads it.
"""
import os
import sys
from typing import Optional, TextIO

BUILTIN_MODEL_ID = "llava-drip-tiny"  # the API's model id for it
# the chat engine's bounds (engine.ChatEngine), here so that the commands' --help need not import torch
DEFAULT_MAX_BATCH_SIZE = 32  # requests decoded together
DEFAULT_MAX_QUEUE = 256  # requests waiting for a place in the batch
SERVE_DTYPES = ("auto", "bfloat16", "float16", "float32")  # --dtype: the names model.builder.resolve_dtype accepts
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny-llava")


def _built_path() -> str:
    from llava_drip.train import tiny_pipeline  # no torch at import
    return os.path.join(tiny_pipeline.DEFAULT_CACHE, "stage2")


def builtin_model_path() -> str:
    """The shipped folder, or where the stand-in is built when the checkout lacks it."""
    return SHIPPED if os.path.isfile(os.path.join(SHIPPED, "MANIFEST.json")) else _built_path()


def is_builtin(model_path: str) -> bool:
    """Whether `model_path` is the built-in model's folder (given explicitly or not)."""
    real = os.path.realpath(os.path.expanduser(model_path))
    return real in (os.path.realpath(SHIPPED), os.path.realpath(_built_path()))


def model_path_help() -> str:
    return (f"model folder (full, LoRA or projector checkpoint); default: the built-in tiny model "
            f"{BUILTIN_MODEL_ID} in {builtin_model_path()}, trained on synthetic shape scenes only")


def resolve_model_path(model_path: Optional[str], file: Optional[TextIO] = None) -> str:
    """The given folder, or the built-in tiny model; says which on `file` (stdout)."""
    if model_path:
        return model_path
    file = sys.stdout if file is None else file
    final = builtin_model_path()
    if final == SHIPPED or os.path.isfile(os.path.join(final, "llava_drip_train.json")):
        print(f"no --model-path: using the built-in tiny model {final}", file=file, flush=True)
        return final
    from llava_drip.train import tiny_pipeline
    print(f"no --model-path and no shipped model in {SHIPPED}: building a stand-in in {tiny_pipeline.DEFAULT_CACHE} "
          "(synthetic data, tiny Llama, stage 1 and 2 on CPU; several minutes, once)", file=file, flush=True)
    return tiny_pipeline.build(tiny_pipeline.DEFAULT_CACHE)


def add_dtype_arg(parser) -> None:
    """The serving commands' shared --dtype flag (demo, chat, serve-api, bench serve)."""
    parser.add_argument("--dtype", default="auto", choices=SERVE_DTYPES,
                        help="weights' dtype (default auto: bfloat16 on CUDA, float32 on CPU)")
