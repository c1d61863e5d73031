"""Model registry and factory: DRIP configs are JSON files registered with open_clip's own registry.

`create_model_and_transforms(name, ...)` mirrors open_clip's: DRIP names build a DRIPCLIP, any other
name (ViT-B-32, ViT-tiny, ...) goes to open_clip unchanged, so open_clip_train can call either.
"""
import copy
import logging
import os
import re
from typing import Any, Dict, Optional, Tuple, Union

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from .model import DRIPCLIP
# the names live in a module without torch or open_clip, for the command line's parsers
from .names import BASELINES, CONFIG_DIR, cli_models, list_models  # noqa: F401  (public here too)

_logger = logging.getLogger(__name__)

TOKENIZER_DIR = CONFIG_DIR.parent / "tokenizers"
_PACKAGE_TOKENIZER = "llava_drip:"  # hf_tokenizer_name prefix for a tokenizer folder shipped here


def _register_configs() -> None:
    """Add our JSON configs to open_clip's registry; a packaged tokenizer name becomes its absolute
    folder, so open_clip's get_tokenizer (open_clip_train's too) loads it from any working directory."""
    open_clip.add_model_config(CONFIG_DIR)
    from open_clip import factory as oc_factory
    for name in {p.stem for p in CONFIG_DIR.glob("*.json")}:
        text_cfg = oc_factory._MODEL_CONFIGS.get(name, {}).get("text_cfg", {})
        tok = text_cfg.get("hf_tokenizer_name", "")
        if tok.startswith(_PACKAGE_TOKENIZER):
            text_cfg["hf_tokenizer_name"] = str(TOKENIZER_DIR / tok[len(_PACKAGE_TOKENIZER):])


_register_configs()


def get_model_config(name: str) -> dict:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise RuntimeError(f"unknown model {name!r}. Available: {list_models()}")
    return cfg


def is_drip(name: str) -> bool:
    return "drip_cfg" in get_model_config(name)


def load_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Read a checkpoint: safetensors, or a torch file (open_clip_train's {'state_dict': ...} included)."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_checkpoint(model: torch.nn.Module, path, strict: bool = True):
    """Load weights strictly; with strict=False the mismatched keys are logged, never ignored silently."""
    sd = load_state_dict(path)
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        msg = (f"{path}: {len(result.missing_keys)} missing keys {result.missing_keys[:8]}, "
               f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:8]}")
        hints = _layout_hints(result.missing_keys, result.unexpected_keys)
        if hints:
            msg += f"; the checkpoint looks built with drip_cfg {', '.join(hints)}"
        if strict:
            raise RuntimeError(msg + " (pass strict=False to load anyway)")
        _logger.warning(msg)
    return result


def _layout_hints(missing, unexpected):
    """drip_cfg flags that change the tower's keys and would explain a mismatch (e.g. a converted
    reference checkpoint loaded without its flags)."""
    def has(keys, suffix):
        return any(k == suffix or k.endswith("." + suffix) for k in keys)
    hints = []
    if has(missing, "ln_pre.weight"):
        hints.append("ln_pre=False")
    if has(unexpected, "ln_pre.weight"):
        hints.append("ln_pre=True")
    if has(unexpected, "proj_bias"):
        hints.append("proj_bias=True")
    if has(missing, "proj_bias"):
        hints.append("proj_bias=False")
    if has(missing, "ln_short.weight"):
        hints.append("shared_norm=True")
    if has(unexpected, "ln_short.weight"):
        hints.append("shared_norm=False")
    return hints


def vit_to_drip_key(key: str, pre_layers: int, post_layers: int) -> Optional[str]:
    """Name of a DRIP tower parameter for an open_clip VisionTransformer key, or None if it has no place."""
    m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if i < pre_layers:
            return f"pre_blocks.{i}.{rest}"
        if i < pre_layers + post_layers:
            return f"post_blocks.{i - pre_layers}.{rest}"
        return None
    if key.startswith(("conv1.", "class_embedding", "positional_embedding", "ln_pre.", "ln_post.", "proj")):
        return key
    return None


def init_from_vit(model: DRIPCLIP, source) -> dict:
    """Copy an open_clip ViT CLIP's matching weights into a DRIPCLIP.

    `source` is a checkpoint path, an open_clip CLIP, or a state dict. Blocks 0..a-1 become the
    pre-pooling blocks, a..a+b-1 the post-pooling ones; the text tower maps one to one.
    Returns {'mapped': [...], 'new': [...], 'unused': [...]} and logs it. Shapes must match.
    """
    if isinstance(source, torch.nn.Module):
        src = source.state_dict()
    elif isinstance(source, dict):
        src = source
    else:
        src = load_state_dict(source)
    tower = model.visual
    a, b = len(tower.pre_blocks), len(tower.post_blocks)
    target = model.state_dict()
    new_sd, mapped, unused = {}, [], []
    for k, v in src.items():
        if k.startswith("visual."):
            dk = vit_to_drip_key(k[len("visual."):], a, b)
            dk = None if dk is None else "visual." + dk
        else:
            dk = k
        if dk is None or dk not in target:
            unused.append(k)
            continue
        if target[dk].shape != v.shape:
            raise ValueError(f"shape mismatch for {k} -> {dk}: checkpoint {tuple(v.shape)} vs model {tuple(target[dk].shape)}")
        new_sd[dk] = v
        mapped.append(dk)
    new = sorted(set(target) - set(new_sd))
    model.load_state_dict({**target, **new_sd}, strict=True)
    report = {"mapped": sorted(mapped), "new": new, "unused": sorted(unused)}
    _logger.info("init from ViT: %d mapped, %d new (%s), %d unused (%s)", len(mapped), len(new),
                 ", ".join(sorted({n.rsplit('.', 1)[0] for n in new})), len(unused),
                 ", ".join(sorted(unused)[:10]))
    return report


def _cast(model: torch.nn.Module, precision: str, device):
    if precision in ("fp16", "bf16", "pure_fp16", "pure_bf16"):
        # the whole DRIP model is cast; the boundary predictor still computes in fp32
        dtype = torch.float16 if "fp16" in precision else torch.bfloat16
        model.to(device=device, dtype=dtype)
    elif precision in ("fp32", "amp", "amp_bf16", "amp_bfloat16", "amp_fp16"):
        model.to(device=device)
    else:
        raise ValueError(f"unknown precision {precision!r}")


def create_model(
    model_name: str,
    pretrained: Optional[str] = None,
    precision: str = "fp32",
    device: Union[str, torch.device] = "cpu",
    init_from_vit_checkpoint: Optional[str] = None,
    strict: bool = True,
    force_image_size: Optional[int] = None,
    force_context_length: Optional[int] = None,
    output_dict: bool = True,
    **kwargs,
):
    """Build a model by name (every model returns open_clip's output dict from forward). For DRIP names, extra kwargs override drip_cfg (e.g. eval_mode='topk');
    for other names everything is passed to open_clip.create_model."""
    if not is_drip(model_name):
        if init_from_vit_checkpoint:
            raise ValueError("init_from_vit_checkpoint only applies to DRIP models")
        return open_clip.create_model(model_name, pretrained, precision=precision, device=device,
                                      force_image_size=force_image_size, force_context_length=force_context_length,
                                      output_dict=output_dict, **kwargs)
    # open_clip_train passes these with their defaults; anything else it passes must be a no-op here
    for k in ("jit", "force_quick_gelu", "force_custom_text", "pretrained_image", "force_patch_dropout"):
        if kwargs.pop(k, None):
            raise ValueError(f"{k} is not supported for DRIP model {model_name}")
    for k in ("cache_dir", "load_weights", "weights_only", "pretrained_text", "force_preprocess_cfg"):
        kwargs.pop(k, None)
    cfg = copy.deepcopy(get_model_config(model_name))
    if force_image_size is not None:
        cfg["vision_cfg"]["image_size"] = force_image_size
    if force_context_length is not None:
        cfg["text_cfg"]["context_length"] = force_context_length
    cfg["drip_cfg"].update(kwargs)
    model = DRIPCLIP(**cfg, output_dict=True)
    if init_from_vit_checkpoint:
        init_from_vit(model, init_from_vit_checkpoint)
    if pretrained:
        load_checkpoint(model, pretrained, strict=strict)
    _cast(model, precision, device)
    return model


def create_model_and_transforms(
    model_name: str,
    pretrained: Optional[str] = None,
    image_mean: Optional[Tuple[float, ...]] = None,
    image_std: Optional[Tuple[float, ...]] = None,
    image_interpolation: Optional[str] = None,
    image_resize_mode: Optional[str] = None,
    aug_cfg: Optional[Any] = None,
    **kwargs,
):
    """(model, preprocess_train, preprocess_val), like open_clip.create_model_and_transforms."""
    if not is_drip(model_name):
        return open_clip.create_model_and_transforms(
            model_name, pretrained, image_mean=image_mean, image_std=image_std,
            image_interpolation=image_interpolation, image_resize_mode=image_resize_mode, aug_cfg=aug_cfg, **kwargs)
    model = create_model(model_name, pretrained, **kwargs)
    pp = dict(model.visual.preprocess_cfg)
    for key, value in (("mean", image_mean), ("std", image_std), ("interpolation", image_interpolation),
                       ("resize_mode", image_resize_mode)):
        if value is not None:
            pp[key] = value
    model.visual.preprocess_cfg = pp
    pp_cfg = PreprocessCfg(**pp)
    return model, image_transform_v2(pp_cfg, is_train=True, aug_cfg=aug_cfg), image_transform_v2(pp_cfg, is_train=False)


def get_tokenizer(model_name: str):
    return open_clip.get_tokenizer(model_name)
