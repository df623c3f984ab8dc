"""Feature-level drafters for VLM (and LM) targets, plugged into the engine's Drafter protocol."""
from .dream import DreamDrafter, DreamHead
from .eagle import EagleDrafter, EagleHead

__all__ = ["EagleDrafter", "EagleHead", "DreamDrafter", "DreamHead"]
