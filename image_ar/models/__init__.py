"""Visual autoregressive models and image tokenizers (own modules where no library has them)."""
from .llamagen import (
    LlamaGen,
    LlamaGenConfig,
    LlamaGenOutput,
    causal_mask,
    cfg_logits,
    generate_tokens,
)
from .vq import VQTokenizer, load_vq, to_pil

__all__ = ["LlamaGen", "LlamaGenConfig", "LlamaGenOutput", "causal_mask", "cfg_logits",
           "generate_tokens", "VQTokenizer", "load_vq", "to_pil"]
