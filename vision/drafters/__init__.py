"""Feature-level drafters for VLM (and LM) targets, plugged into the engine's Drafter protocol."""
from .assistant import AssistantDrafter
from .dflash import DFlashDrafter, DFlashHead
from .dream import DreamDrafter, DreamHead
from .eagle import EagleDrafter, EagleHead
from .eagle3 import Eagle3Head
from .load import feature_drafter_kind, load_feature_drafter
from .mtp import MtpHead, MtpModelHead

__all__ = ["EagleDrafter", "EagleHead", "Eagle3Head", "DFlashDrafter", "DFlashHead", "AssistantDrafter", "DreamDrafter", "DreamHead",
           "MtpHead", "MtpModelHead", "feature_drafter_kind", "load_feature_drafter"]
