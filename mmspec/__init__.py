"""mmspec: lossless speculative decoding for VLMs and autoregressive image generators — the common engine."""
from .errors import MMSpecError
from .loop import GenerationOutput, SpeculativeDecoder, TokenEvent
from .request import Request
from .sampling import SamplingSpec
from .stats import GenerationStats
from .tree import Draft, DynamicTree, StaticTree

__version__ = "0.1.0"
__all__ = ["SpeculativeDecoder", "Request", "GenerationOutput", "TokenEvent", "SamplingSpec", "GenerationStats", "Draft",
           "StaticTree", "DynamicTree", "MMSpecError"]
