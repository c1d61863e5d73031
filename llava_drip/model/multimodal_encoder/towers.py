"""Vision towers for LLaVA. Each returns, per image, the [G_b, D] tokens the projector receives.

- DRIPVisionTower: the DRIP tower from a clip-train checkpoint; G_b varies per image.
- OpenCLIPVisionTower: an open_clip ViT (the baseline), patch tokens of a chosen block.
- HFCLIPVisionTower: transformers' CLIPVisionModel, as in a standard LLaVA-1.5 setup.

token_pos='centroid' (--mm_vision_token_pos) appends to every token a 2-D sin/cos code of where it lies
(a DRIP group: the mean (row, col) of its patches; a ViT patch: its own cell): a CLIP tower's last blocks
keep little of the input position embedding, and without it a small LLaVA cannot say where things are.

Towers are frozen (unless --mm_tunable_parts names mm_vision_tower) and stay in eval mode even when the
trainer calls model.train(): DRIP samples its boundaries in train mode, and LLaVA must see the
deterministic ones it will see at inference.
"""
import logging
from typing import List, Optional

import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)


class OpenCLIPImageProcessor:
    """Adapter giving an open_clip transform the slice of CLIPImageProcessor's API LLaVA code uses."""

    def __init__(self, transform, image_size: int, mean, std):
        self.transform = transform
        self.image_mean = list(mean)
        self.image_std = list(std)
        self.crop_size = {"height": image_size, "width": image_size}
        self.size = {"shortest_edge": image_size}

    def preprocess(self, images, return_tensors: str = "pt"):
        if return_tensors != "pt":
            raise ValueError("only return_tensors='pt' is supported")
        if not isinstance(images, (list, tuple)):
            images = [images]
        return {"pixel_values": torch.stack([self.transform(im.convert("RGB")) for im in images])}

    __call__ = preprocess


TOKEN_POS = (None, "centroid")
POS_FREQS = 8  # per axis: sin and cos at pi * 2^k, k < 8 -> 32 extra channels


def position_code(pos: torch.Tensor) -> torch.Tensor:
    """[..., 2] (row, col) in [0, 1] -> [..., 4 * POS_FREQS] sin/cos features (frequencies pi * 2^k)."""
    freqs = torch.pi * 2.0 ** torch.arange(POS_FREQS, device=pos.device, dtype=torch.float32)
    angles = pos.float()[..., None] * freqs  # [..., 2, F]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def grid_positions(grid, with_cls: bool) -> torch.Tensor:
    """[(1 +) h * w, 2] (row, col) in [0, 1] of a ViT's patches in raster order; CLS sits at the centre."""
    gh, gw = grid
    rows = torch.arange(gh).repeat_interleave(gw).float() / max(gh - 1, 1)
    cols = torch.arange(gw).repeat(gh).float() / max(gw - 1, 1)
    pos = torch.stack([rows, cols], dim=-1)
    return torch.cat([torch.full((1, 2), 0.5), pos]) if with_cls else pos


class _FrozenTower(nn.Module):
    select_layer: int
    select_feature: str
    token_pos: Optional[str] = None

    def _check_token_pos(self):
        if self.token_pos not in TOKEN_POS:
            raise ValueError(f"unexpected mm_vision_token_pos {self.token_pos!r}: use one of {TOKEN_POS}")

    @property
    def pos_dims(self) -> int:
        return 4 * POS_FREQS if self.token_pos == "centroid" else 0

    def _with_positions(self, feats: List[torch.Tensor], positions: List[torch.Tensor]) -> List[torch.Tensor]:
        return [torch.cat([f, position_code(p).to(f.dtype)], dim=-1) for f, p in zip(feats, positions)]

    def _grid_coded(self, feats: torch.Tensor, grid) -> List[torch.Tensor]:
        """[B, L, D] ViT tokens -> per-image list, each with its cell's code when token_pos is set."""
        feats = list(feats.unbind(0))
        if self.token_pos is None:
            return feats
        pos = grid_positions(grid, self.select_feature == "cls_patch").to(feats[0].device)
        return self._with_positions(feats, [pos] * len(feats))

    def train(self, mode: bool = True):
        return super().train(False)

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    @property
    def device(self):
        return next(self.parameters()).device

    def _check_feature(self):
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"unexpected mm_vision_select_feature {self.select_feature!r}: use 'patch' or 'cls_patch'")

    def freeze(self):
        self.requires_grad_(False)
        self.eval()


def _grad_if_trainable(forward):
    """No autograd graph through a frozen tower; gradients when --mm_tunable_parts trains it."""
    def wrapped(self, *args, **kwargs):
        trainable = any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            return forward(self, *args, **kwargs)
    wrapped.__doc__ = forward.__doc__
    return wrapped


def _no_budget(tower, budget):
    if budget is not None and not (isinstance(budget, (list, tuple)) and all(b is None for b in budget)):
        raise ValueError(f"a token budget needs a DRIP tower; {tower.name} keeps all {tower.num_patches} patches")


def _visual_state_dict(path: str) -> dict:
    from llava_drip.drip.factory import load_state_dict
    sd = load_state_dict(path)
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    return visual or sd  # a tower-only file has no prefix


def checkpoint_drip_flags(path: str) -> Optional[dict]:
    """The tower flags a checkpoint carries in its safetensors metadata (`llava-drip convert-reference` writes
    the reference-parity ones: ln_pre, proj_bias, shared_norm, ...); None for a plain clip-train checkpoint.
    eval_mode is left out: LLaVA picks its own (--drip_eval_mode)."""
    if not str(path).endswith(".safetensors"):
        return None
    import json
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("drip_cfg")
    if not raw:
        return None
    flags = json.loads(raw)
    flags.pop("eval_mode", None)
    return flags or None


class DRIPVisionTower(_FrozenTower):
    def __init__(self, name: str, select_layer: int = -1, select_feature: str = "patch",
                 eval_mode: str = "calibrated", pretrained: Optional[str] = None, budget=None,
                 drip_flags: Optional[dict] = None, token_pos: Optional[str] = None):
        super().__init__()
        self.token_pos = token_pos
        self._check_token_pos()
        from llava_drip.drip.factory import get_model_config, is_drip
        from llava_drip.drip.model import build_drip_tower
        from open_clip.transform import PreprocessCfg, image_transform_v2
        if not is_drip(name):
            raise ValueError(f"{name} is not a DRIP model")
        cfg = get_model_config(name)
        from llava_drip.drip.budget import parse_budget
        self.name, self.select_layer, self.select_feature = name, select_layer, select_feature
        self.budget = parse_budget(budget)  # default tokens per image (None: the eval_mode's rule)
        self._check_feature()
        drip_cfg = {**cfg["drip_cfg"], **(drip_flags or {}), "eval_mode": eval_mode}
        self.vision_tower = build_drip_tower(cfg["embed_dim"], cfg["vision_cfg"], drip_cfg)
        if pretrained:
            self.vision_tower.load_state_dict(_visual_state_dict(pretrained), strict=True)
            _logger.info("loaded DRIP tower %s from %s", name, pretrained)
        pp = self.vision_tower.preprocess_cfg
        self.image_processor = OpenCLIPImageProcessor(
            image_transform_v2(PreprocessCfg(**pp), is_train=False), pp["size"], pp["mean"], pp["std"])
        self.freeze()

    @property
    def hidden_size(self) -> int:
        return self.vision_tower.width + self.pos_dims

    @property
    def num_patches(self) -> int:
        return self.vision_tower.num_patches

    @_grad_if_trainable
    def forward(self, images: torch.Tensor, budget=None) -> List[torch.Tensor]:
        """budget: one spec or one per image (llava_drip.drip.budget); None: the tower's default."""
        out = self.vision_tower.encode_tokens(images.to(self.dtype), select_layer=self.select_layer,
                                              drop_cls=self.select_feature == "patch",
                                              budget=self.budget if budget is None else budget,
                                              with_positions=self.token_pos is not None)
        return self._with_positions(*out) if self.token_pos is not None else out


class OpenCLIPVisionTower(_FrozenTower):
    def __init__(self, name: str, select_layer: int = -2, select_feature: str = "patch",
                 pretrained: Optional[str] = None, token_pos: Optional[str] = None):
        super().__init__()
        import open_clip
        self.name, self.select_layer, self.select_feature = name, select_layer, select_feature
        self.token_pos = token_pos
        self._check_feature()
        self._check_token_pos()
        clip = open_clip.create_model(name)
        self.vision_tower = clip.visual
        if pretrained:
            self.vision_tower.load_state_dict(_visual_state_dict(pretrained), strict=True)
        pp = self.vision_tower.preprocess_cfg
        size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
        self.image_processor = OpenCLIPImageProcessor(
            open_clip.transform.image_transform_v2(open_clip.transform.PreprocessCfg(**pp), is_train=False),
            size, pp["mean"], pp["std"])
        self.freeze()

    @property
    def hidden_size(self) -> int:
        return self.vision_tower.conv1.out_channels + self.pos_dims

    @property
    def num_patches(self) -> int:
        g = self.vision_tower.grid_size
        return g[0] * g[1]

    @_grad_if_trainable
    def forward(self, images: torch.Tensor, budget=None) -> List[torch.Tensor]:
        _no_budget(self, budget)
        depth = len(self.vision_tower.transformer.resblocks)
        index = self.select_layer if self.select_layer >= 0 else depth + self.select_layer
        out = self.vision_tower.forward_intermediates(
            images.to(self.dtype), indices=[index], stop_early=True, intermediates_only=True,
            output_fmt="NLC", output_extra_tokens=True)
        feats = out["image_intermediates"][0]
        if self.select_feature == "cls_patch":
            feats = torch.cat([out["image_intermediates_prefix"][0], feats], dim=1)
        return self._grid_coded(feats, self.vision_tower.grid_size)


class HFCLIPVisionTower(_FrozenTower):
    def __init__(self, name: str, select_layer: int = -2, select_feature: str = "patch", load_weights: bool = True,
                 token_pos: Optional[str] = None):
        super().__init__()
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
        self.name, self.select_layer, self.select_feature = name, select_layer, select_feature
        self.token_pos = token_pos
        self._check_feature()
        self._check_token_pos()
        self.image_processor = CLIPImageProcessor.from_pretrained(name)
        if load_weights:
            self.vision_tower = CLIPVisionModel.from_pretrained(name)
        else:  # weights come with the saved LLaVA model
            self.vision_tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(name))
        self.freeze()

    @property
    def hidden_size(self) -> int:
        return self.vision_tower.config.hidden_size + self.pos_dims

    @property
    def num_patches(self) -> int:
        c = self.vision_tower.config
        return (c.image_size // c.patch_size) ** 2

    @_grad_if_trainable
    def forward(self, images: torch.Tensor, budget=None) -> List[torch.Tensor]:
        _no_budget(self, budget)
        out = self.vision_tower(images.to(self.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            feats = feats[:, 1:]
        c = self.vision_tower.config
        return self._grid_coded(feats, (c.image_size // c.patch_size,) * 2)
