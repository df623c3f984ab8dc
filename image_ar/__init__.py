"""image_ar: speculative decoding for visual autoregressive image generators (LlamaGen-style, Janus, Emu3).

    from image_ar import SpeculativeImagePipeline
    pipe = SpeculativeImagePipeline.from_pretrained(target_dir, vq=vq_dir, drafter="jacobi")
    out = pipe(class_labels=[3, 7], guidance_scale=4.0, acceptance="lossless")

See docs/image_ar.md. Lossless by default; ``acceptance="lantern" | "gsd"`` are lossy and report their measured TV.
"""
from .drafters import ImageHead, ImageHeadDrafter, ImageModelDrafter, JacobiDrafter
from .models.llamagen import LlamaGen, LlamaGenConfig, generate_tokens
from .models.vq import VQTokenizer, load_vq
from .pipeline import ImagePipelineOutput, ImageStats, SpeculativeImagePipeline
from .target import LlamaGenTarget

__all__ = ["SpeculativeImagePipeline", "ImagePipelineOutput", "ImageStats", "LlamaGenTarget", "JacobiDrafter",
           "ImageModelDrafter", "ImageHead", "ImageHeadDrafter", "LlamaGen", "LlamaGenConfig", "generate_tokens", "VQTokenizer", "load_vq"]
