"""Loading a saved feature drafter (EAGLE, EAGLE-3, MSD or DREAM head, with its compressor; a DFlash drafter) by what
its config says."""
from __future__ import annotations

from mmspec.checkpoint import checkpoint_kind

from .dflash import DFlashDrafter, DFlashHead
from .dream import DreamDrafter, DreamHead
from .eagle import EagleDrafter, EagleHead
from .eagle3 import Eagle3Head

KINDS = {EagleHead.KIND: (EagleHead, EagleDrafter), Eagle3Head.KIND: (Eagle3Head, EagleDrafter),
         DreamHead.KIND: (DreamHead, DreamDrafter),
         DFlashHead.KIND: (DFlashHead, DFlashDrafter)}


def feature_drafter_kind(path) -> str | None:
    """The kind recorded in `path`/config.json when it is a feature-drafter checkpoint, else None."""
    kind = checkpoint_kind(path)
    return kind if kind in KINDS else None


def load_feature_drafter(path, target, tree=4) -> EagleDrafter:
    """The drafter saved in `path` (by `save_pretrained` or `mmspec train-drafter`) for `target`: its head class
    follows the checkpoint's kind; a checkpoint made for another target is an IncompatibleModelsError."""
    head_cls, drafter_cls = KINDS.get(feature_drafter_kind(path), (EagleHead, EagleDrafter))
    return drafter_cls(head_cls.from_pretrained(path, target), tree)
