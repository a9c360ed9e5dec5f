"""A linear probe on patch features: what a backbone's patch rows are worth to a dense head.

DigitScenes labels each patch of a scene digit ink, distractor or background (``Scene.patch_labels``). A probe is
fitted on the *dense* backbone's frozen patch features, then applied unchanged to the patch features of another
model of the same layout: a reduced backbone whose original token layout fxprune restored (docs/methods.md).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .datasets import DigitScenes

__all__ = [
    "CLASSES", "TRAIN_SEED", "TEST_SEED", "PatchProbe", "MaskScores", "labelled_scenes", "patch_features", "fit_probe",
    "mask_scores",
]

CLASSES = ("background", "digit", "distractor")
TRAIN_SEED, TEST_SEED = 11, 1  # the DigitScenes seeds of the scenes a probe is fitted on, and of those it is tested on


class PatchProbe(nn.Module):
    """A linear classifier of standardised patch features ``[…, C]`` into :data:`CLASSES`: logits ``[…, 3]``."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(mean.shape[-1], len(CLASSES))
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear((features - self.mean) / self.std)

    def predict(self, features: Tensor) -> Tensor:
        """The class of each patch of ``features`` ``[…, C]``: ``[…]``."""
        with torch.no_grad():
            return self(features).argmax(-1)


@dataclasses.dataclass(frozen=True)
class MaskScores:
    """Per-patch accuracy, the mean over :data:`CLASSES` of the intersection over union, and the digit's IoU, in %."""

    accuracy: float
    miou: float
    digit_iou: float


def labelled_scenes(split: str, count: int, seed: int) -> tuple[Tensor, Tensor]:
    """``count`` DigitScenes of ``split`` (``seed`` as :class:`DigitScenes`): images ``[M, 3, S, S]`` and each patch's
    class ``[M, P]`` (row-major over the patch grid)."""
    data = DigitScenes(split, count, seed=seed)
    scenes = [data.scene(i) for i in range(count)]
    return torch.stack([s.image for s in scenes]), torch.stack([s.patch_labels() for s in scenes])


def patch_features(model: nn.Module, images: Tensor, prefix: int, batch: int = 250) -> Tensor:
    """The patch rows of ``model``'s every-token output ``[M, P, C]`` on ``images`` (``prefix`` leading rows left
    out), computed ``batch`` images at a time."""
    with torch.no_grad():
        return torch.cat([model(images[i:i + batch])[:, prefix:] for i in range(0, len(images), batch)])


def fit_probe(features: Tensor, labels: Tensor, steps: int = 500, lr: float = 1e-2, seed: int = 0) -> PatchProbe:
    """A :class:`PatchProbe` fitted to ``labels`` ``[M, P]`` from ``features`` ``[M, P, C]`` (full-batch Adam on the
    cross-entropy, ``steps`` steps; the features standardised by their own mean and deviation)."""
    torch.manual_seed(seed)
    x, y = features.reshape(-1, features.shape[-1]).detach(), labels.flatten()
    probe = PatchProbe(x.mean(0), x.std(0) + 1e-6)
    optimiser = torch.optim.Adam(probe.parameters(), lr=lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(probe(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return probe.eval()


def mask_scores(predicted: Tensor, labels: Tensor) -> MaskScores:
    """:class:`MaskScores` of the predicted classes against ``labels`` (same shape); a class absent from both counts
    as an IoU of 1."""
    ious = []
    for c in range(len(CLASSES)):
        inter = ((predicted == c) & (labels == c)).sum().item()
        union = ((predicted == c) | (labels == c)).sum().item()
        ious.append(inter / union if union else 1.0)
    accuracy = (predicted == labels).float().mean().item()
    return MaskScores(100 * accuracy, 100 * sum(ious) / len(ious), 100 * ious[1])
