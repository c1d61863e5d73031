"""LLaVA with pluggable vision towers (DRIP, open_clip ViT, HF CLIP). Importing registers `llava_llama`."""
from .language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

__all__ = ["LlavaConfig", "LlavaLlamaForCausalLM"]
