"""DigitScenes: real handwritten digits placed in cluttered scenes, a small benchmark that ships with fxprune.

Each scene is a ``[3, S, S]`` image in ``[0, 1]`` holding one enlarged digit from scikit-learn's
``load_digits`` (1,797 real 8×8 handwritten digits) at a random place, scale, colour and slight
slant, over noise and dimmer fragments of other digits. The label is that digit. Most patches are
background or distractors, the setting adaptive token reduction is for. Train and test scenes use
disjoint *source* digits (80/20 split of the 1,797), so no test digit is seen in training. Scene ``i``
of a dataset depends only on ``(seed, i)``.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["DigitScenes", "source_digits"]

_SPLITS = ("train", "test")


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def source_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The 8×8 digits ``[M, 8, 8]`` (in ``[0, 1]``) and labels ``[M]`` a split draws from (80/20, fixed)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    images, labels = _digits()
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    chosen = order[:cut] if split == "train" else order[cut:]
    return images[chosen], labels[chosen]


def _resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an ``[h, w]`` array to ``[height, width]``."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))[None, None]
    out = torch.nn.functional.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def _distort(digit: np.ndarray, side: int, strength: float, rng: np.random.Generator) -> np.ndarray:
    """``digit`` enlarged to ``[side, side]`` under a random rotation (up to ±12°), shear (±0.15) and
    aspect change (±15%), each scaled by ``strength``."""
    angle = np.deg2rad(rng.uniform(-12, 12) * strength)
    shear, aspect = rng.uniform(-0.15, 0.15) * strength, 1 + rng.uniform(-0.15, 0.15) * strength
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rotation @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([aspect, 1.0 / aspect])
    theta = torch.zeros(1, 2, 3)
    theta[0, :, :2] = torch.from_numpy(np.linalg.inv(matrix))
    grid = torch.nn.functional.affine_grid(theta, (1, 1, side, side), align_corners=False)
    source = torch.from_numpy(digit)[None, None]
    return torch.nn.functional.grid_sample(source, grid, align_corners=False)[0, 0].numpy()


def _colour(rng: np.random.Generator, low: float) -> np.ndarray:
    colour = rng.uniform(0.2, 1.0, size=3).astype(np.float32)
    colour[rng.integers(3)] = rng.uniform(low, 1.0)
    return colour


INK = 0.3  # a pixel whose pasted intensity (before colour and noise) exceeds this is ink


@dataclasses.dataclass(frozen=True)
class Scene:
    """One scene: the image ``[3, S, S]``, its label, the digit's box ``(top, left, size)`` in pixels and where ink
    was pasted: ``ink`` ``[S, S]`` the digit's, ``distractors`` ``[S, S]`` the fragments' (pasted intensity above
    :data:`INK`)."""

    image: torch.Tensor
    label: int
    box: tuple[int, int, int]
    ink: torch.Tensor
    distractors: torch.Tensor

    def patch_labels(self, patch: int = 8) -> torch.Tensor:
        """Per ``patch × patch`` patch, row-major ``[(S / patch)²]``: 1 where at least an eighth of its pixels are the
        digit's ink, else 2 where as many are a distractor's, else 0 (background)."""
        def share(mask: torch.Tensor) -> torch.Tensor:
            side = mask.shape[0] // patch
            return mask.float().view(side, patch, side, patch).mean(dim=(1, 3)).flatten()

        digit, distractor = share(self.ink) >= 1 / 8, share(self.distractors) >= 1 / 8
        return torch.where(digit, 1, torch.where(distractor, 2, 0))


class DigitScenes(Dataset):
    """``n`` deterministic scenes of ``split`` (``'train'`` or ``'test'``); items are ``(image, label)``.

    ``size``: canvas side in pixels (≥ 64); ``digit_size``: range of the digit's side; ``fragments``:
    range of the number of distractor fragments; ``noise``: standard deviation of the pixel noise;
    ``distortion``: strength of the digit's random rotation, shear and aspect change (1: up to ±12°,
    ±0.15, ±15%; the default 0.3 keeps digits close to upright, as the source digits are).
    """

    def __init__(
        self,
        split: str,
        n: int,
        seed: int = 0,
        size: int = 64,
        digit_size: tuple[int, int] = (28, 40),
        fragments: tuple[int, int] = (3, 6),
        noise: float = 0.05,
        distortion: float = 0.3,
    ):
        if size < 64:
            raise ValueError(f"size must be at least 64 pixels, got {size}")
        self.images, self.labels = source_digits(split)
        self.split, self.n, self.seed, self.size = split, n, seed, size
        self.digit_size, self.fragments, self.noise, self.distortion = digit_size, fragments, noise, distortion

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        scene = self.scene(index)
        return scene.image, scene.label

    def scene(self, index: int) -> Scene:
        """Scene ``index`` with its digit's box."""
        if not 0 <= index < self.n:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, _SPLITS.index(self.split), index])
        canvas = np.zeros((3, self.size, self.size), dtype=np.float32)
        distractors = np.zeros((self.size, self.size), dtype=bool)
        for _ in range(rng.integers(self.fragments[0], self.fragments[1] + 1)):
            self._paste_fragment(canvas, distractors, rng)
        source = rng.integers(len(self.images))
        side = int(rng.integers(self.digit_size[0], self.digit_size[1] + 1))
        top, left = (int(v) for v in rng.integers(0, self.size - side + 1, size=2))
        digit = _distort(self.images[source], side, self.distortion, rng)
        region = canvas[:, top : top + side, left : left + side]
        np.maximum(region, digit[None] * _colour(rng, 0.8)[:, None, None], out=region)
        ink = np.zeros((self.size, self.size), dtype=bool)
        ink[top : top + side, left : left + side] = digit > INK
        canvas += rng.normal(0.0, self.noise, size=canvas.shape).astype(np.float32)
        image = torch.from_numpy(np.clip(canvas, 0.0, 1.0))
        return Scene(image, int(self.labels[source]), (top, left, side), torch.from_numpy(ink),
                     torch.from_numpy(distractors & ~ink))

    def _paste_fragment(self, canvas: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
        """A dimmer piece (at most 4×4 of 8×8) of a random digit, enlarged like a real digit, at a random place;
        ``mask`` marks its ink."""
        digit = self.images[rng.integers(len(self.images))]
        h, w = (int(v) for v in rng.integers(2, 5, size=2))
        r, c = int(rng.integers(0, 9 - h)), int(rng.integers(0, 9 - w))
        scale = rng.uniform(self.digit_size[0], self.digit_size[1]) / 8.0
        piece = _resize(digit[r : r + h, c : c + w], round(h * scale), round(w * scale))
        top = int(rng.integers(0, self.size - piece.shape[0] + 1))
        left = int(rng.integers(0, self.size - piece.shape[1] + 1))
        region = canvas[:, top : top + piece.shape[0], left : left + piece.shape[1]]
        np.maximum(region, piece[None] * (0.6 * _colour(rng, 0.5))[:, None, None], out=region)
        mask[top : top + piece.shape[0], left : left + piece.shape[1]] |= piece > INK
