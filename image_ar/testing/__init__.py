"""Tiny offline image-AR models for tests (no hub access anywhere)."""
from .tiny import tiny_llamagen, tiny_vq

__all__ = ["tiny_llamagen", "tiny_vq"]
