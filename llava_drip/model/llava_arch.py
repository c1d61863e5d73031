"""LLaVA's architecture as mixins over any HF causal LM: vision tower + projector, and the splice of each
image's visual tokens into the text embeddings at its `-200` placeholder.

DRIP hands a different number of tokens per image, so features travel as a list of [G_b, D] tensors;
padding and CLS never reach the LLM and an image's tokens do not depend on its batch mates.
"""
from typing import List

import torch

from llava_drip.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

from .multimodal_encoder.builder import build_vision_tower, resolve_tower_type
from .multimodal_projector.builder import build_vision_projector


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
        cfg.mm_drip_eval_mode = model_args.drip_eval_mode
        cfg.mm_drip_budget = model_args.drip_budget
        cfg.mm_projector_type = model_args.mm_projector_type
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
        lengths = [f.shape[0] for f in feats]
        proj = self.get_model().mm_projector
        dtype = next(proj.parameters()).dtype if any(True for _ in proj.parameters()) else feats[0].dtype
        packed = proj(torch.cat(feats, dim=0).to(dtype))
        return list(packed.split(lengths, dim=0))

    def prepare_inputs_labels_for_multimodal(self, input_ids, attention_mask, labels, images,
                                             padding_side: str = "right", budget=None):
        """Splice visual tokens into the embeddings. Returns (inputs_embeds, attention_mask, position_ids, labels).

        `images` holds one image per sample (text-only samples in a mixed batch carry a dummy image
        that is encoded but used with zero length, so every rank runs the same modules under ZeRO-3).
        """
        embed = self.get_model().embed_tokens
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        B = input_ids.shape[0]
        image_feats = None
        if images is not None:
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
