"""LLaVA over Llama, registered with AutoConfig / AutoModelForCausalLM as `llava_llama`."""
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel

from ..llava_arch import LlavaMetaForCausalLM, LlavaMetaModel


@dataclass(repr=False)
class LlavaConfig(LlamaConfig):
    model_type = "llava_llama"
    mm_vision_tower: Optional[str] = None
    mm_vision_tower_type: str = "auto"  # drip | open_clip | hf_clip | auto
    mm_vision_tower_pretrained: Optional[str] = None  # clip-train checkpoint the tower came from
    mm_vision_select_layer: int = -1
    mm_vision_select_feature: str = "patch"
    mm_drip_eval_mode: str = "calibrated"  # calibrated | threshold | topk | sample (checkpoints before: threshold)
    mm_drip_budget: Optional[str] = None  # default tokens per image: '0.25', '16', 'mean:0.25' (drip/budget.py)
    mm_hidden_size: Optional[int] = None
    mm_projector_type: str = "linear"
    image_aspect_ratio: str = "pad"
    tokenizer_model_max_length: Optional[int] = None
    tokenizer_padding_side: str = "right"
    tune_mm_mlp_adapter: bool = False
    mm_use_im_start_end: bool = False
    # LLaVA's own fields, saved so LLaVA's builder reads our folders as it reads its own
    # (mm_use_im_patch_token defaults to True there: missing, it grows the vocabulary on load)
    mm_use_im_patch_token: bool = False
    use_mm_proj: bool = True
    mm_patch_merge_type: str = "flat"
    freeze_mm_mlp_adapter: bool = False
    image_grid_pinpoints: Optional[str] = None
    mm_projector_lr: Optional[float] = None


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    config_class = LlavaConfig


class LlavaLlamaForCausalLM(LlamaForCausalLM, LlavaMetaForCausalLM):
    config_class = LlavaConfig

    def __init__(self, config):
        super(LlamaForCausalLM, self).__init__(config)  # PreTrainedModel init, skipping LlamaForCausalLM's
        self.model = LlavaLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                labels=None, images=None, budgets=None, **kwargs):
        if inputs_embeds is None and images is not None:
            inputs_embeds, attention_mask, position_ids, labels = self.prepare_inputs_labels_for_multimodal(
                input_ids, attention_mask, labels, images, padding_side="right", budget=budgets)
            input_ids = None
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, inputs: Optional[torch.Tensor] = None, images: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, input_ids: Optional[torch.Tensor] = None,
                 budget=None, **kwargs):
        """Greedy/sampled generation with the KV cache; returns only the new tokens.

        Prompts are re-padded on the left after splicing, so each row's positions start at 0
        whatever its batch mates' lengths (generate derives position ids from the mask).
        budget: DRIP visual tokens per image ('0.25', 16, 'mean:0.25', or one per image); None: the
        config's mm_drip_budget, else the tower's eval_mode.
        """
        if "inputs_embeds" in kwargs:
            raise ValueError("pass input_ids (with -200 placeholders) and images, not inputs_embeds")
        inputs = inputs if inputs is not None else input_ids  # peft passes input_ids by keyword
        if inputs is None:
            raise ValueError("generate needs input_ids")
        embeds, mask, _, _ = self.prepare_inputs_labels_for_multimodal(
            inputs, attention_mask, None, images, padding_side="left", budget=budget)
        return super().generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)


AutoConfig.register("llava_llama", LlavaConfig)
AutoModelForCausalLM.register(LlavaConfig, LlavaLlamaForCausalLM)
