"""LLaVA over Llama, registered with AutoConfig / AutoModelForCausalLM as `llava_llama`."""
from dataclasses import dataclass

from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel

from ..llava_arch import LlavaForCausalLMMixin, LlavaMetaConfig, LlavaMetaModel


@dataclass(repr=False)
class LlavaConfig(LlamaConfig, LlavaMetaConfig):
    model_type = "llava_llama"


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    config_class = LlavaConfig


class LlavaLlamaForCausalLM(LlavaForCausalLMMixin, LlamaForCausalLM):
    config_class = LlavaConfig
    llava_model_class = LlavaLlamaModel


AutoConfig.register("llava_llama", LlavaConfig)
AutoModelForCausalLM.register(LlavaConfig, LlavaLlamaForCausalLM)
