"""DRIP: a CLIP ViT that predicts segment boundaries between patch tokens and mean-pools each segment.

The names below load with their submodule on first use (PEP 562), so `llava_drip.drip.names` (model
names and eval modes for the command line) imports without torch or open_clip. Importing factory, as
any of its names does, registers the DRIP configs with open_clip.
"""
import importlib

_EXPORTS = {
    "BoundaryPredictor": "boundary", "binomial_prior_loss": "boundary", "even_boundaries": "boundary",
    "sample_boundaries": "boundary",
    "create_model": "factory", "create_model_and_transforms": "factory", "get_model_config": "factory",
    "get_tokenizer": "factory", "init_from_vit": "factory", "is_drip": "factory", "list_models": "factory",
    "load_checkpoint": "factory",
    "DRIPCLIP": "model",
    "group_mean_pool": "pooling",
    "DRIPFeatures": "tower", "DRIPVisionTransformer": "tower",
}
_SUBMODULES = ("boundary", "budget", "factory", "model", "names", "pooling", "tower")

__all__ = [
    "BoundaryPredictor", "DRIPCLIP", "DRIPFeatures", "DRIPVisionTransformer", "binomial_prior_loss",
    "create_model", "create_model_and_transforms", "even_boundaries", "get_model_config", "get_tokenizer",
    "group_mean_pool", "init_from_vit", "is_drip", "list_models", "load_checkpoint", "sample_boundaries",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
