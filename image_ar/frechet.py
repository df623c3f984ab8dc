"""Fréchet distance between image sets, on the features of the zoo's own image classifier (FID-style).

Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"
(arXiv:1706.08500), eq. 6: fit a Gaussian to each set's features and take the Fréchet (2-Wasserstein) distance

    d^2 = |mu_1 - mu_2|^2 + tr(C_1) + tr(C_2) - 2 tr((C_1^{1/2} C_2 C_1^{1/2})^{1/2}).

FID uses Inception-v3 features, which no machine here can download; the zoo trains a small classifier on its own image
set (`image_ar.shapes`) instead (`ShapeClassifier`: three conv stages, global average pool, linear) and reads its
penultimate features. The numbers are comparable with each other (same classifier, same sample counts), not with
published FIDs. Like FID the estimate is biased upwards at small sample counts: compare sets of equal size.

The matrix square roots are of symmetric PSD matrices, so they come from eigendecompositions (float64, negative
eigenvalues from round-off clipped to 0); scipy is not needed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmspec.checkpoint import read_kind_config, read_safetensors, write_checkpoint
from mmspec.errors import CheckpointError, ImageError, InvalidInputError

CONFIG_NAME, WEIGHTS_NAME, KIND = "config.json", "model.safetensors", "image_ar.classifier"


@dataclass
class ClassifierConfig:
    num_classes: int = 10
    channels: tuple[int, ...] = (16, 32, 64)
    image_size: int = 32

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if not self.channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.channels):
            raise InvalidInputError(f"ClassifierConfig.channels={self.channels!r}: positive ints")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise InvalidInputError(f"ClassifierConfig.num_classes={self.num_classes!r}: an int >= 2")


class ShapeClassifier(nn.Module):
    """conv3x3-GELU-conv3x3-GELU-avgpool stages -> global average pool (the features) -> linear (the logits)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        stages, c_in = [], 3
        for c in config.channels:
            stages += [nn.Conv2d(c_in, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
                       nn.AvgPool2d(2)]
            c_in = c
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, config.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.fc.in_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] (resized to the training size if they differ) -> features (B, F)."""
        if not (torch.is_tensor(images) and images.dim() == 4 and images.shape[1] == 3):
            raise ImageError(f"expected images (B, 3, H, W) in [-1, 1]; got {getattr(images, 'shape', images)}")
        size = self.config.image_size
        x = images.to(self.fc.weight)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.stages(x).mean((2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(images))

    def save_pretrained(self, directory) -> Path:
        return write_checkpoint(directory, KIND, dataclasses.asdict(self.config), self.state_dict(),
                                config_name=CONFIG_NAME, weights_name=WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory) -> "ShapeClassifier":
        directory = Path(directory)
        raw = dict(read_kind_config(directory / CONFIG_NAME, KIND, "ShapeClassifier"))
        raw.pop("kind")
        try:
            model = cls(ClassifierConfig(**raw))
        except (TypeError, InvalidInputError) as e:
            raise CheckpointError(f"{str(directory / CONFIG_NAME)!r}: invalid classifier config ({e})") from e
        state = read_safetensors(directory / WEIGHTS_NAME, "classifier checkpoint")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{str(directory)!r}: the weights do not match the config ({e})") from e
        return model.eval()


# --- the distance -----------------------------------------------------------------------------------------------------
def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The PSD square root of a symmetric PSD matrix (D, D), by eigendecomposition (float64)."""
    m = matrix.double()
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def gaussian(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), float64."""
    if not torch.is_tensor(features) or features.dim() != 2 or len(features) < 2:
        raise InvalidInputError(f"features must be (N, D) with N >= 2; got "
                                f"{tuple(features.shape) if torch.is_tensor(features) else type(features).__name__}")
    x = features.double()
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def frechet_from_stats(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """d^2 between N(mu1, cov1) and N(mu2, cov2) (the module docstring's formula)."""
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)):
        raise InvalidInputError(f"Gaussians of different sizes: mean {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
                                f"covariance {tuple(cov1.shape)} / {tuple(cov2.shape)}")
    mu1, mu2, cov1, cov2 = mu1.double(), mu2.double(), cov1.double(), cov2.double()
    root1 = sqrtm_psd(cov1)
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0).sqrt().sum()  # tr((C1^.5 C2 C1^.5)^.5)
    d2 = (mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross
    return float(d2.clamp(min=0))


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance (squared, as FID reports it) between two feature sets (N, D) and (M, D)."""
    if features_a.shape[1:] != features_b.shape[1:]:
        raise InvalidInputError(f"feature sets of different widths: {tuple(features_a.shape)} vs "
                                f"{tuple(features_b.shape)}")
    return frechet_from_stats(*gaussian(features_a), *gaussian(features_b))


def principal_axes(features: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and the top `dims` principal axes (D, dims) of a reference feature set (N, D), float64.

    With a few dozen images per set a full-width covariance estimate is mostly noise (FID itself needs thousands of
    images); projecting every set onto the reference's leading axes keeps the Fréchet distance's form while making
    it stable at small sample counts."""
    mu, cov = gaussian(features)
    vals, vecs = torch.linalg.eigh(cov)
    return mu, vecs[:, vals.argsort(descending=True)[:dims]]


def project(features: torch.Tensor, axes: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    mu, basis = axes
    return (features.double() - mu) @ basis


@torch.no_grad()
def image_features(classifier: ShapeClassifier, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The classifier's features (N, F) of images (N, 3, H, W) in [-1, 1], in batches."""
    return torch.cat([classifier.features(images[i:i + batch]) for i in range(0, len(images), batch)]).cpu()
