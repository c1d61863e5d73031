"""DRIP: a CLIP ViT that predicts segment boundaries between patch tokens and mean-pools each segment."""
from .boundary import BoundaryPredictor, binomial_prior_loss, even_boundaries, sample_boundaries
from .factory import (create_model, create_model_and_transforms, get_model_config, get_tokenizer, init_from_vit,
                      is_drip, list_models, load_checkpoint)
from .model import DRIPCLIP
from .pooling import group_mean_pool
from .tower import DRIPFeatures, DRIPVisionTransformer

__all__ = [
    "BoundaryPredictor", "DRIPCLIP", "DRIPFeatures", "DRIPVisionTransformer", "binomial_prior_loss",
    "create_model", "create_model_and_transforms", "even_boundaries", "get_model_config", "get_tokenizer",
    "group_mean_pool", "init_from_vit", "is_drip", "list_models", "load_checkpoint", "sample_boundaries",
]
