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
    """The kind recorded in `path`/config.json when it is a feature-drafter checkpoint ("eagle3:speculators" /
    "eagle3:sglang" for an EAGLE-3 drafter in a serving engine's layout), else None."""
    from vision.export import serving_layout

    kind = checkpoint_kind(path)
    if kind in KINDS:
        return kind
    layout = serving_layout(path)
    return f"eagle3:{layout}" if layout else None


def load_feature_drafter(path, target, tree=4) -> EagleDrafter:
    """The drafter saved in `path` (by `save_pretrained` or `mmspec train-drafter`, or an EAGLE-3 drafter in the
    layout vLLM's speculators or SGLang load) for `target`: its head class follows the checkpoint's kind; a
    checkpoint made for another target is an IncompatibleModelsError."""
    kind = feature_drafter_kind(path)
    if kind is not None and kind.startswith("eagle3:"):
        from vision.export import load_serving_drafter

        return EagleDrafter(load_serving_drafter(path, target), tree)
    head_cls, drafter_cls = KINDS.get(kind, (EagleHead, EagleDrafter))
    return drafter_cls(head_cls.from_pretrained(path, target), tree)
