"""LLaVA over Mistral, registered as `llava_mistral` (LLaVA's and LLaVA-NeXT's model_type and class names)."""
from dataclasses import dataclass

from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig, MistralForCausalLM, MistralModel

from ..llava_arch import LlavaForCausalLMMixin, LlavaMetaConfig, LlavaMetaModel


@dataclass(repr=False)
class LlavaMistralConfig(MistralConfig, LlavaMetaConfig):
    model_type = "llava_mistral"


class LlavaMistralModel(LlavaMetaModel, MistralModel):
    config_class = LlavaMistralConfig


class LlavaMistralForCausalLM(LlavaForCausalLMMixin, MistralForCausalLM):
    config_class = LlavaMistralConfig
    llava_model_class = LlavaMistralModel


AutoConfig.register("llava_mistral", LlavaMistralConfig)
AutoModelForCausalLM.register(LlavaMistralConfig, LlavaMistralForCausalLM)
