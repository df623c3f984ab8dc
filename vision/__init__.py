"""mmspec.vision: lossless speculative decoding for stock transformers vision-language models."""
from .pipeline import ChatSession, SpeculativeVLM, VLMOutput
from .target import VLMRequest, VLMRunner, VLMTarget

__all__ = ["SpeculativeVLM", "ChatSession", "VLMOutput", "VLMTarget", "VLMRunner", "VLMRequest"]
