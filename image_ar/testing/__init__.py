"""Tiny offline image-AR models for tests (no hub access anywhere)."""
from .tiny import perturbed, tiny_continuous, tiny_continuous_config, tiny_llamagen, tiny_vq

__all__ = ["perturbed", "tiny_continuous", "tiny_continuous_config", "tiny_llamagen", "tiny_vq"]
