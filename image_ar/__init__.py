"""image_ar: speculative decoding for visual autoregressive image generators (LlamaGen-style, Janus, Emu3, and
MAR-style continuous-token models with exact CSpD).

    from image_ar import SpeculativeImagePipeline
    pipe = SpeculativeImagePipeline.from_pretrained(target_dir, vq=vq_dir, drafter="jacobi")
    out = pipe(class_labels=[3, 7], guidance_scale=4.0, acceptance="lossless")

See docs/image_ar.md. Lossless by default; ``acceptance="lantern" | "gsd"`` are lossy and report their measured TV.
"""
from .acceptance.cspd import CSpD
from .continuous_target import ContinuousARTarget
from .drafters import ImageHead, ImageHeadDrafter, ImageModelDrafter, JacobiDrafter
from .drafters.continuous import ContinuousDrafter
from .models.continuous_ar import ContinuousAR, ContinuousARConfig, generate_continuous
from .models.llamagen import LlamaGen, LlamaGenConfig, generate_tokens
from .models.vq import VQTokenizer, load_vq
from .pipeline import ImagePipelineOutput, ImageStats, SpeculativeImagePipeline
from .target import LlamaGenTarget

__all__ = ["SpeculativeImagePipeline", "ImagePipelineOutput", "ImageStats", "LlamaGenTarget", "JacobiDrafter",
           "ImageModelDrafter", "ImageHead", "ImageHeadDrafter", "LlamaGen", "LlamaGenConfig", "generate_tokens",
           "VQTokenizer", "load_vq", "ContinuousAR", "ContinuousARConfig", "ContinuousARTarget", "ContinuousDrafter",
           "CSpD", "generate_continuous"]
