"""Tiny offline models for tests, the demo and benchmarks (no hub access anywhere)."""
from .tiny import (noisy_copy, save_deepseek_v3_with_mtp, tiny_deepseek_v3, tiny_gemma4, tiny_gemma4_assistant,
                   tiny_llama, tiny_qwen3_5, widen_, word_tokenizer)

__all__ = ["tiny_llama", "tiny_qwen3_5", "tiny_gemma4", "tiny_gemma4_assistant", "tiny_deepseek_v3", "noisy_copy",
           "save_deepseek_v3_with_mtp", "widen_", "word_tokenizer"]
