"""LLaVA's architecture as mixins over any HF causal LM: vision tower + projector, and the splice of each
image's visual tokens into the text embeddings at its `-200` placeholder.

One LLM family is four short classes (language_model/llava_llama.py, llava_qwen.py, llava_mistral.py):
    config  = dataclass(HFConfig, LlavaMetaConfig)          LLaVA's config fields
    model   = (LlavaMetaModel, HFModel)                     tower + projector on the base model
    lm      = (LlavaForCausalLMMixin, HFForCausalLM)        __init__, forward, generate: written once here

DRIP hands a different number of tokens per image, so features travel as a list of [G_b, D] tensors;
padding and CLS never reach the LLM and an image's tokens do not depend on its batch mates.
"""
from dataclasses import dataclass
from typing import Optional, List

import torch
from transformers import PreTrainedModel

from llava_drip.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

from .multimodal_encoder.builder import build_vision_tower, resolve_tower_type
from .multimodal_projector.builder import build_vision_projector


@dataclass(repr=False, eq=False)
class LlavaMetaConfig:
    """LLaVA's config fields, shared by every LLM family (HF configs are dataclasses in transformers 5).

    List it after the HF config: ``@dataclass(repr=False) class C(Qwen2Config, LlavaMetaConfig)``.
    """
    mm_vision_tower: Optional[str] = None
    mm_vision_tower_type: str = "auto"  # drip | open_clip | hf_clip | auto
    mm_vision_tower_pretrained: Optional[str] = None  # clip-train checkpoint the tower came from
    mm_vision_select_layer: int = -1
    mm_vision_select_feature: str = "patch"
    mm_vision_token_pos: Optional[str] = None  # 'centroid': each token carries where it lies (towers.py)
    mm_drip_eval_mode: str = "calibrated"  # calibrated | threshold | topk | sample (checkpoints before: threshold)
    mm_drip_budget: Optional[str] = None  # default tokens per image: '0.25', '16', 'mean:0.25' (drip/budget.py)
    mm_drip_arch: Optional[dict] = None  # tower flags its checkpoint carries (convert-reference: ln_pre, proj_bias, ...)
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


class LlavaMetaModel:
    """Mixin for the base model (e.g. LlamaModel): owns `vision_tower` and `mm_projector`."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "mm_vision_tower", None):
            # weights arrive with the checkpoint (from_pretrained) or via initialize_vision_modules
            self.vision_tower = build_vision_tower(config, load_weights=False)
            self.mm_projector = build_vision_projector(config)

    def get_vision_tower(self):
        return getattr(self, "vision_tower", None)

    def initialize_vision_modules(self, model_args):
        """Attach (or re-attach) the tower with its pretrained weights and a projector (stage 1/2 start)."""
        cfg = self.config
        cfg.mm_vision_tower = model_args.vision_tower
        # the resolved kind is saved, so loading never re-guesses it (a stage-1 folder with an HF tower)
        cfg.mm_vision_tower_type = resolve_tower_type(model_args.vision_tower, model_args.vision_tower_type)
        cfg.mm_vision_tower_pretrained = model_args.vision_tower_pretrained
        cfg.mm_vision_select_layer = model_args.mm_vision_select_layer
        cfg.mm_vision_select_feature = model_args.mm_vision_select_feature
        cfg.mm_vision_token_pos = getattr(model_args, "mm_vision_token_pos", None)
        cfg.mm_drip_eval_mode = model_args.drip_eval_mode
        cfg.mm_drip_budget = model_args.drip_budget
        cfg.mm_projector_type = model_args.mm_projector_type
        if cfg.mm_vision_tower_type == "drip" and model_args.vision_tower_pretrained:
            from .multimodal_encoder.towers import checkpoint_drip_flags
            cfg.mm_drip_arch = checkpoint_drip_flags(model_args.vision_tower_pretrained)  # saved: reloads build the same
        if cfg.mm_vision_tower_type != "hf_clip" and not model_args.vision_tower_pretrained:
            # an untrained DRIP / open_clip tower would train LLaVA on noise without a word
            raise ValueError(f"--vision_tower {model_args.vision_tower} ({cfg.mm_vision_tower_type}) needs "
                             "--vision_tower_pretrained: its clip-train checkpoint")
        self.vision_tower = build_vision_tower(cfg, load_weights=True)
        cfg.mm_hidden_size = self.vision_tower.hidden_size
        if getattr(self, "mm_projector", None) is None or model_args.pretrain_mm_mlp_adapter is None:
            self.mm_projector = build_vision_projector(cfg)
        if model_args.pretrain_mm_mlp_adapter:
            from .builder import load_projector_weights
            load_projector_weights(self.mm_projector, model_args.pretrain_mm_mlp_adapter)
        self.mm_projector.to(dtype=self.embed_tokens.weight.dtype, device=self.embed_tokens.weight.device)
        self.mm_projector.requires_grad_(True)


class LlavaMetaForCausalLM:
    """Mixin for the causal-LM class: encode images and build inputs_embeds / labels."""

    def get_model(self):
        return self.model

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    def encode_images(self, images: torch.Tensor, budget=None) -> List[torch.Tensor]:
        """[B, 3, H, W] -> list of B tensors [G_b, hidden], projected in one packed call.

        budget: DRIP tokens per image, one spec or one per image (llava_drip.drip.budget)."""
        tower = self.get_vision_tower()
        feats = tower(images) if budget is None else tower(images, budget=budget)
        return self.project_features(feats)

    def project_features(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        """Tower outputs (list of [G_b, C]) -> LLM-width tokens, all images in one packed projector call."""
        lengths = [f.shape[0] for f in feats]
        proj = self.get_model().mm_projector
        dtype = next(proj.parameters()).dtype if any(True for _ in proj.parameters()) else feats[0].dtype
        packed = proj(torch.cat(feats, dim=0).to(dtype))
        return list(packed.split(lengths, dim=0))

    def prepare_inputs_labels_for_multimodal(self, input_ids, attention_mask, labels, images,
                                             padding_side: str = "right", budget=None, image_features=None):
        """Splice visual tokens into the embeddings. Returns (inputs_embeds, attention_mask, position_ids, labels).

        `images` holds one image per sample (text-only samples in a mixed batch carry a dummy image
        that is encoded but used with zero length, so every rank runs the same modules under ZeRO-3).
        `image_features` (one projected [G_b, hidden] per sample) replaces `images` when the caller has
        encoded them already (the serving engine encodes an image once and reuses it every turn).
        """
        embed = self.get_model().embed_tokens
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        B = input_ids.shape[0]
        image_feats = image_features
        if image_feats is not None and len(image_feats) != B:
            raise ValueError(f"got {len(image_feats)} image features for a batch of {B} prompts: one per sample")
        if image_feats is None and images is not None:
            if images.shape[0] != B:
                raise ValueError(f"got {images.shape[0]} images for a batch of {B} prompts: one image per sample")
            image_feats = self.encode_images(images, budget)
        embeds, new_labels = [], []
        for i in range(B):
            ids = input_ids[i][attention_mask[i]]
            lab = labels[i][attention_mask[i]] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
            where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            if len(where) > 1:
                raise ValueError(f"sample {i} has {len(where)} <image> tokens; one image per sample is supported")
            if where and image_feats is None:
                raise ValueError(f"sample {i} has an <image> token but no image was given")
            text_ids = ids.clamp(min=0)  # the sentinel is replaced below; clamp keeps embedding lookup valid
            text_emb = embed(text_ids)
            if where:
                p = where[0]
                feat = image_feats[i].to(text_emb.dtype)
                emb = torch.cat([text_emb[:p], feat, text_emb[p + 1:]], dim=0)
                lab = torch.cat([lab[:p], lab.new_full((feat.shape[0],), IGNORE_INDEX), lab[p + 1:]])
            else:
                emb = text_emb
                if image_feats is not None:  # keep the projector in the graph (ZeRO-3 needs every rank alike)
                    emb = torch.cat([emb, image_feats[i][:0].to(emb.dtype)], dim=0)
            embeds.append(emb)
            new_labels.append(lab)
        max_len = getattr(self.config, "tokenizer_model_max_length", None)
        if max_len:
            embeds = [e[:max_len] for e in embeds]
            new_labels = [l[:max_len] for l in new_labels]
        return _pad_batch(embeds, new_labels, padding_side)


class LlavaForCausalLMMixin(LlavaMetaForCausalLM):
    """__init__, forward and generate of every LLaVA causal LM, whatever the LLM family.

    List it before the HF class, ``class LlavaQwenForCausalLM(LlavaForCausalLMMixin, Qwen2ForCausalLM)``,
    so these methods win and their super() calls reach the HF ones. A subclass names its base model
    class in `llava_model_class` (LlavaMetaModel + the HF base model).
    """
    llava_model_class = None

    def __init__(self, config):
        # PreTrainedModel's init only: the HF class's own would first build a plain text model
        PreTrainedModel.__init__(self, config)
        self.model = self.llava_model_class(config)
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


def _pad_batch(embeds: List[torch.Tensor], labels: List[torch.Tensor], padding_side: str):
    B, T = len(embeds), max(e.shape[0] for e in embeds)
    D, dtype, device = embeds[0].shape[1], embeds[0].dtype, embeds[0].device
    out = torch.zeros(B, T, D, dtype=dtype, device=device)
    out_labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long, device=device)
    mask = torch.zeros(B, T, dtype=torch.long, device=device)
    pos = torch.zeros(B, T, dtype=torch.long, device=device)
    for i, (e, l) in enumerate(zip(embeds, labels)):
        n = e.shape[0]
        sl = slice(T - n, T) if padding_side == "left" else slice(0, n)
        out[i, sl] = e
        out_labels[i, sl] = l
        mask[i, sl] = 1
        pos[i, sl] = torch.arange(n, device=device)
    return out, mask, pos, out_labels
