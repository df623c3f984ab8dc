"""Tiny offline models for tests, the demo and benchmarks (no hub access anywhere)."""
from .tiny import noisy_copy, tiny_llama, widen_, word_tokenizer

__all__ = ["tiny_llama", "noisy_copy", "widen_", "word_tokenizer"]
