"""DRIPCLIP: open_clip's CLIP with the DRIP image tower in place of its ViT.

A thin subclass, not a fork: the text tower, logit scale, encode_text and get_logits are open_clip's.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from .tower import DRIPVisionTransformer

# open_clip builds a vision tower in CLIP.__init__; give it the smallest one, it is replaced at once
_PLACEHOLDER_VISION = {"image_size": 8, "patch_size": 8, "width": 8, "layers": 1, "head_width": 8}


class DRIPCLIP(CLIP):
    def __init__(self, embed_dim: int, vision_cfg: dict, text_cfg: dict, drip_cfg: dict,
                 quick_gelu: bool = False, init_logit_scale: float = 2.6592, init_logit_bias: Optional[float] = None,
                 cast_dtype: Optional[torch.dtype] = None, output_dict: bool = True):
        super().__init__(embed_dim, _PLACEHOLDER_VISION, text_cfg, quick_gelu=quick_gelu,
                         init_logit_scale=init_logit_scale, init_logit_bias=init_logit_bias,
                         cast_dtype=cast_dtype, output_dict=output_dict)
        self.visual = build_drip_tower(embed_dim, vision_cfg, drip_cfg)

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None) -> dict:
        """open_clip's output dict plus `boundary_loss` and the realised ratios (always a dict)."""
        out = {}
        if image is not None:
            image_features, feats = self.visual.forward_with_aux(image)
            out["image_features"] = F.normalize(image_features, dim=-1)
            out["boundary_loss"] = feats.boundary_loss
            out["boundary_ratio"] = feats.boundary_ratio
            out["group_ratio"] = feats.group_ratio
        if text is not None:
            out["text_features"] = self.encode_text(text, normalize=True)
        out["logit_scale"] = self.logit_scale.exp()
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def build_drip_tower(embed_dim: int, vision_cfg: dict, drip_cfg: dict) -> DRIPVisionTransformer:
    """Map open_clip's vision_cfg (+ drip_cfg) onto the tower's constructor, refusing unknown keys."""
    vision_cfg = dict(vision_cfg)
    width = vision_cfg.pop("width", 768)
    head_width = vision_cfg.pop("head_width", 64)
    layers = vision_cfg.pop("layers", None)
    kwargs = dict(
        image_size=vision_cfg.pop("image_size", 224),
        patch_size=vision_cfg.pop("patch_size", 32),
        mlp_ratio=vision_cfg.pop("mlp_ratio", 4.0),
        width=width, heads=width // head_width, output_dim=embed_dim,
    )
    if vision_cfg:
        raise ValueError(f"vision_cfg keys not supported by the DRIP tower: {sorted(vision_cfg)}")
    kwargs.update(drip_cfg)
    tower = DRIPVisionTransformer(**kwargs)
    if layers is not None and layers != len(tower.pre_blocks) + len(tower.post_blocks):
        raise ValueError(f"vision_cfg.layers={layers} but drip_cfg has "
                         f"{len(tower.pre_blocks)} pre + {len(tower.post_blocks)} post blocks")
    return tower
