"""llava-drip: LLaVA with DRIP, a CLIP ViT that pools its patch tokens into fewer learned segments."""

__version__ = "0.1.0"
