"""Tiny offline VLMs of every supported family, for tests, the demo and benchmarks (no hub access anywhere)."""
from .tiny import FAMILIES, TEXT_ONLY_FAMILIES, TinyVLM, draft_vlm, test_image, text_drafter, tiny_vlm

__all__ = ["FAMILIES", "TEXT_ONLY_FAMILIES", "TinyVLM", "tiny_vlm", "draft_vlm", "text_drafter", "test_image"]
