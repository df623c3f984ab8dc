"""Which parts of the image a compressing drafter's acceptance depends on: an occlusion map over image regions.

A feature drafter with a compressor (ViSpec's query compressor, pooling, pruning; `vision.compressors`) sees the
image only through the compressor's output. `region_acceptance` hides one region of the image's patch grid at a time
from the compressor's *input* (its features replaced by the image's mean feature), answers the same questions again
and records the mean acceptance length (vLLM's: 1 + accepted drafts per drafted step). The target never sees the
change, so every answer stays the target's own (`identical` says so); only the drafts change. Regions whose hiding
costs acceptance are the ones the drafter reads (cf. the occlusion maps of Zeiler & Fergus 2014, "Visualizing and
Understanding Convolutional Networks", section 4.2).

    svlm = SpeculativeVLM.from_pretrained("zoo:vlm", drafter="zoo:vlm-vispec")
    m = region_acceptance(svlm, [{"images": [img], "prompt": "Describe the image."}], region=2)
    m.drop          # (rows, cols): acceptance length lost when that region is hidden
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mmspec.errors import InvalidInputError
from mmspec.stats import vllm_metrics_of


@dataclass
class RegionMap:
    baseline: float  # mean acceptance length with the whole image visible
    hidden: torch.Tensor  # (rows, cols): mean acceptance length with that region hidden
    identical: bool  # every answer equal to the baseline's (the target's own)
    patch_grid: tuple[int, int]  # the image's patch grid the regions tile

    @property
    def drop(self) -> torch.Tensor:
        return self.baseline - self.hidden


@contextmanager
def hide_region(compressor, cells: torch.Tensor):
    """Within the block, the compressor receives the image features with `cells` ((h, w) bool over the patch grid,
    True = hidden) replaced by the image's mean feature."""
    def pre(module, args, kwargs):
        feats = args[0]  # (B, N, D)
        keep = ~cells.reshape(1, -1, 1).to(feats.device)
        if keep.shape[1] != feats.shape[1]:
            raise InvalidInputError(f"region mask of {keep.shape[1]} cells for an image of {feats.shape[1]} tokens")
        mean = feats.mean(1, keepdim=True).expand_as(feats)
        return (torch.where(keep, feats, mean),) + tuple(args[1:]), kwargs

    handle = compressor.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def patch_grid(model) -> tuple[int, int]:
    """The (rows, cols) patch grid of a LLaVA-style target's vision tower."""
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    return side, side


def region_acceptance(svlm, rows: list[dict], region: int = 2, max_new_tokens: int = 48) -> RegionMap:
    """Occlusion map of `svlm`'s compressing drafter over blocks of `region` x `region` patches (module docstring).
    rows: [{"images": [...], "prompt": str}]; greedy decoding."""
    compressor = getattr(svlm.drafter, "compressor", None)
    if compressor is None:
        raise InvalidInputError("region_acceptance needs a feature drafter with a compressor (e.g. zoo:vlm-vispec); "
                                f"this SpeculativeVLM drafts with {type(svlm.drafter).__name__} without one")
    h, w = patch_grid(svlm.model)
    if region < 1 or h % region or w % region:
        raise InvalidInputError(f"region={region}: must divide the {h}x{w} patch grid")

    def run():
        outs = [svlm.generate(images=r["images"], prompt=r["prompt"], max_new_tokens=max_new_tokens) for r in rows]
        return [o.token_ids for o in outs], vllm_metrics_of([o.stats for o in outs])["mean_acceptance_length"]

    ref, base = run()
    hidden, same = torch.zeros(h // region, w // region), True
    for i in range(h // region):
        for j in range(w // region):
            cells = torch.zeros(h, w, dtype=torch.bool)
            cells[i * region:(i + 1) * region, j * region:(j + 1) * region] = True
            with hide_region(compressor, cells):
                seqs, hidden[i, j] = run()
            same = same and seqs == ref
    return RegionMap(base, hidden, same, (h, w))
