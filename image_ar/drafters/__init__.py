"""Drafters for image targets: SJD (no model), a small LlamaGen, an EAGLE-style head on the target's features."""
from .head import ImageHead, ImageHeadDrafter, is_head_checkpoint
from .jacobi import JacobiDrafter
from .model import ImageModelDrafter

__all__ = ["ImageHead", "ImageHeadDrafter", "is_head_checkpoint", "JacobiDrafter", "ImageModelDrafter"]
