"""LLaVA with pluggable vision towers (DRIP, open_clip ViT, HF CLIP) over Llama, Qwen2 or Mistral.

Importing registers `llava_llama`, `llava_qwen` and `llava_mistral` with AutoConfig / AutoModelForCausalLM.
"""
import json
import os

from .language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from .language_model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM
from .language_model.llava_qwen import LlavaQwen2ForCausalLM, LlavaQwenConfig, LlavaQwenForCausalLM

# LLaVA model_type -> (config class, model class)
LLAVA_CLASSES = {
    "llava_llama": (LlavaConfig, LlavaLlamaForCausalLM),
    "llava_qwen": (LlavaQwenConfig, LlavaQwenForCausalLM),
    "llava_mistral": (LlavaMistralConfig, LlavaMistralForCausalLM),
}
# a base LLM's model_type (or LLaVA's own names) -> the LLaVA model_type built over it
_LLAVA_TYPE = {"qwen2": "llava_qwen", "llava_qwen": "llava_qwen",
               "mistral": "llava_mistral", "llava_mistral": "llava_mistral"}


def llava_classes(model_type: str):
    """(config class, model class) for a base LLM's or a LLaVA folder's model_type.

    Anything not Qwen2 or Mistral is Llama, as before (LLaVA-1.5's `llava`, `llama`, unknown types).
    """
    return LLAVA_CLASSES[_LLAVA_TYPE.get(model_type, "llava_llama")]


def folder_model_type(path: str) -> str:
    """config.json's model_type ('' when absent: from_pretrained then names the missing file)."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return ""
    with open(cfg) as f:
        return json.load(f).get("model_type", "")


__all__ = ["LlavaConfig", "LlavaLlamaForCausalLM", "LlavaQwenConfig", "LlavaQwenForCausalLM", "LlavaQwen2ForCausalLM",
           "LlavaMistralConfig", "LlavaMistralForCausalLM", "LLAVA_CLASSES", "llava_classes", "folder_model_type"]
