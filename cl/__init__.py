"""clsim core: frozen timm ViT backbones, adapters and mixtures, heads, retrieval index, the one training loop."""

__version__ = "0.1.0"
