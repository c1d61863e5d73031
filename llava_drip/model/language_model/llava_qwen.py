"""LLaVA over Qwen2 / Qwen2.5, registered as `llava_qwen` (LLaVA-NeXT's model_type and class names)."""
from dataclasses import dataclass

from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2Model

from ..llava_arch import LlavaForCausalLMMixin, LlavaMetaConfig, LlavaMetaModel


@dataclass(repr=False)
class LlavaQwenConfig(Qwen2Config, LlavaMetaConfig):
    model_type = "llava_qwen"


class LlavaQwenModel(LlavaMetaModel, Qwen2Model):
    config_class = LlavaQwenConfig


class LlavaQwenForCausalLM(LlavaForCausalLMMixin, Qwen2ForCausalLM):
    config_class = LlavaQwenConfig
    llava_model_class = LlavaQwenModel


LlavaQwen2ForCausalLM = LlavaQwenForCausalLM  # the name by its transformers family (Qwen2 covers Qwen2.5)

AutoConfig.register("llava_qwen", LlavaQwenConfig)
AutoModelForCausalLM.register(LlavaQwenConfig, LlavaQwenForCausalLM)
