"""The Fréchet distance of generated image tokens to real images of the zoo's image set, in a few lines.

    fd = FrechetScorer(load("image-classifier"), load("vq"))
    fd(out.tokens)           # tokens (N, T) -> Fréchet distance to 1000 real images

The same measurement as `mmspec bench image` (`image_ar.bench`): the zoo classifier's features of the decoded images
and of real images of `image_ar.shapes`, both projected onto the real features' top `dims` principal axes (stable at a
few dozen images; `image_ar.frechet.principal_axes`). Two sets drawn from one distribution still differ at small
sample counts: compare a lossy setting with a lossless one of the same size (the noise floor), never with 0.
"""
from __future__ import annotations

import torch

from . import shapes
from .frechet import frechet_distance, image_features, principal_axes, project


class FrechetScorer:
    def __init__(self, classifier, vq, reference_images: int = 1000, dims: int = 8, seed: int = 20_000):
        self.classifier, self.vq = classifier, vq
        real = image_features(classifier, shapes.dataset(reference_images, seed=seed, size=vq.image_size)[0])
        self.axes = principal_axes(real, dims)
        self.real = project(real, self.axes)  # (N, dims)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens (N, T) -> images (N, 3, H, W) in [-1, 1]."""
        side = int(round(tokens.shape[1] ** 0.5))
        return self.vq.decode_codes(tokens, side)

    def __call__(self, tokens: torch.Tensor) -> float:
        return frechet_distance(project(image_features(self.classifier, self.decode(tokens)), self.axes), self.real)
