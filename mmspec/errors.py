"""Typed errors of mmspec.

Every error names the offending input and says what would be valid. They subclass the matching builtin
(`ValueError`, `TypeError`, ...) so callers that already catch those keep working.
"""
from __future__ import annotations


class MMSpecError(Exception):
    """Base class of every error raised on purpose by mmspec."""


class InvalidInputError(MMSpecError, ValueError):
    """A user-supplied argument has a value that cannot be used (empty prompt, bad image, ...)."""


class EmptyPromptError(InvalidInputError):
    """A prompt has no tokens."""


class GenerationConfigError(InvalidInputError):
    """A sampling / generation argument is out of range (max_new_tokens <= 0, temperature < 0, ...)."""


class IncompatibleModelsError(MMSpecError, ValueError):
    """Target and drafter cannot work together (vocabulary, tokenizer, device or dtype differ)."""


class VocabularyMismatchError(IncompatibleModelsError):
    """Target and drafter have different vocabularies."""


class DeviceMismatchError(IncompatibleModelsError):
    """Tensors or models that must share a device or dtype do not."""


class NonFiniteLogitsError(MMSpecError, FloatingPointError):
    """A model returned NaN or infinite logits (or a probability row with no mass after warping)."""


class ContextOverflowError(InvalidInputError):
    """The prompt (plus the requested new tokens) does not fit in the model's context window."""


class UnsupportedModelError(MMSpecError, TypeError):
    """A model, cache or configuration that this adapter cannot drive."""


class CheckpointError(MMSpecError, ValueError):
    """A checkpoint is missing, corrupt, of an unsafe format, or was made for another model."""


class DraftError(MMSpecError, ValueError):
    """A draft handed to the verifier is malformed (bad parents, wrong shapes, tokens out of range)."""


class ImageError(InvalidInputError):
    """An image cannot be used: unreadable, corrupt, truncated, empty (0 pixels) or of an unknown type."""


class ImageCountError(InvalidInputError):
    """The number of images does not match the image placeholders of the prompt (or the model's limit)."""


class TokenizerMismatchError(IncompatibleModelsError):
    """A drafter's tokenizer maps text to different ids than the target's."""


class DatasetError(InvalidInputError):
    """A training dataset is missing, empty or malformed (names the file, the record and what is expected)."""
