"""Pick the vision tower from the config's explicit `mm_vision_tower_type` (never from name substrings)."""
import os
import re

TOWER_TYPES = ("drip", "open_clip", "hf_clip")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as in LLaVA-1.5's openai/clip-vit-large-patch14-336


def resolve_tower_type(name: str, tower_type: str = "auto") -> str:
    """'auto' resolves a registered model name to drip/open_clip, and a folder with config.json or an HF hub
    id (owner/name, fetched by transformers when a hub is reachable) to hf_clip."""
    if tower_type != "auto":
        if tower_type not in TOWER_TYPES:
            raise ValueError(f"unknown vision tower type {tower_type!r}; expected one of {TOWER_TYPES} or 'auto'")
        return tower_type
    from llava_drip.drip.factory import is_drip, list_models
    import open_clip
    if name in list_models() or name in open_clip.list_models():
        return "drip" if is_drip(name) else "open_clip"
    if os.path.isfile(os.path.join(name, "config.json")):
        return "hf_clip"
    if not os.path.exists(name) and _HUB_ID.fullmatch(name):
        return "hf_clip"
    raise ValueError(f"cannot resolve vision tower {name!r}: not a registered model name, not a folder with an "
                     f"HF config.json and not a hub id (owner/name); set --vision_tower_type")


def build_vision_tower(config, load_weights: bool = True):
    """Build the tower a LlavaConfig describes. load_weights=False when the weights come with the model."""
    name = config.mm_vision_tower
    kind = resolve_tower_type(name, getattr(config, "mm_vision_tower_type", "auto"))
    pretrained = config.mm_vision_tower_pretrained if load_weights else None
    token_pos = getattr(config, "mm_vision_token_pos", None)
    from .towers import DRIPVisionTower, HFCLIPVisionTower, OpenCLIPVisionTower
    if kind == "drip":
        return DRIPVisionTower(name, config.mm_vision_select_layer, config.mm_vision_select_feature,
                               eval_mode=getattr(config, "mm_drip_eval_mode", "calibrated"), pretrained=pretrained,
                               budget=getattr(config, "mm_drip_budget", None),
                               drip_flags=getattr(config, "mm_drip_arch", None), token_pos=token_pos)
    if kind == "open_clip":
        return OpenCLIPVisionTower(name, config.mm_vision_select_layer, config.mm_vision_select_feature,
                                   pretrained=pretrained, token_pos=token_pos)
    return HFCLIPVisionTower(name, config.mm_vision_select_layer, config.mm_vision_select_feature,
                             load_weights=load_weights, token_pos=token_pos)
