"""Generic drafters: an independent small model and a train-free n-gram / prompt-lookup proposer."""
from .base import DraftContext, Drafter, DrafterCounters, RowUpdate
from .model import ModelDrafter
from .ngram import NGramDrafter

__all__ = ["DraftContext", "Drafter", "DrafterCounters", "RowUpdate", "ModelDrafter", "NGramDrafter"]
