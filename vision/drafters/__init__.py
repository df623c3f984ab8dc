"""Feature-level drafters for VLM (and LM) targets, plugged into the engine's Drafter protocol."""
from .dream import DreamDrafter, DreamHead
from .eagle import EagleDrafter, EagleHead
from .load import feature_drafter_kind, load_feature_drafter

__all__ = ["EagleDrafter", "EagleHead", "DreamDrafter", "DreamHead", "feature_drafter_kind", "load_feature_drafter"]
