"""Feature-level drafters for VLM (and LM) targets, plugged into the engine's Drafter protocol."""
from .eagle import EagleDrafter, EagleHead

__all__ = ["EagleDrafter", "EagleHead"]
