"""Patch features of a reduced ViT under a dense head: a linear probe on DigitScenes patch labels.

    python benchmarks/dense_probe.py                      # about two minutes on 2 CPU cores
    python benchmarks/dense_probe.py --picture probe.png  # also the predicted masks of a few scenes

The digits ViT as a backbone (``reset_classifier(0, "")``: its output is every token, ``[B, 65, 64]``). Each 8×8
patch of a scene is labelled digit ink, distractor or background (``Scene.patch_labels``: at least an eighth of
its pixels). A linear probe is trained on the *dense* model's frozen patch features of ``--train`` training scenes,
then applied unchanged to the patch features each method gives on ``--test`` test scenes, with the original token
layout restored (fxprune's default for a dense output): kept and merged tokens take the row that holds them, a
dropped token (EViT's fused ones too) its state where its block dropped it. EViT, Top-K (blocks 1, 3, 4) and ToMe
(every block) are fitted to 85%, 70% and 55% of the dense MACs; ClusTR (every block, which keeps every token)
at 32, 16 and 8 clusters of 64 patches. Reported: patch accuracy, the mean over the three classes of the
intersection over union (mIoU), and the IoU of the digit class.
"""

from __future__ import annotations

import argparse

import torch

import fxprune
from fxprune.tools.datasets import DigitScenes
from fxprune.tools.models import digits_vit
from fxprune.tools.search import keep_rate_for, tome_r_for
from fxprune.tools.speed import machine

CLASSES = ("background", "digit", "distractor")
LAYERS = (1, 3, 4)


def _scenes(split: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = DigitScenes(split, count, seed=seed)
    scenes = [data.scene(i) for i in range(count)]
    return torch.stack([s.image for s in scenes]), torch.stack([s.patch_labels() for s in scenes])


def _features(model: torch.nn.Module, images: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """The patch rows of ``model``'s output ``[M, N − P, C]``, in batches."""
    with torch.no_grad():
        return torch.cat([model(images[i:i + 250])[:, prefix:] for i in range(0, len(images), 250)])


def _train_probe(features: torch.Tensor, labels: torch.Tensor, steps: int = 500) -> torch.nn.Linear:
    torch.manual_seed(0)
    probe = torch.nn.Linear(features.shape[-1], len(CLASSES))
    optimiser = torch.optim.Adam(probe.parameters(), lr=1e-2)
    x, y = features.reshape(-1, features.shape[-1]), labels.flatten()
    mean, std = x.mean(0), x.std(0) + 1e-6
    probe.register_buffer("mean", mean)
    probe.register_buffer("std", std)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(probe((x - mean) / std), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return probe.eval()


def _predict(probe: torch.nn.Linear, features: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return probe((features - probe.mean) / probe.std).argmax(-1)


def _scores(predicted: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    """(patch accuracy, mean IoU over the classes, IoU of the digit class), in %."""
    ious = []
    for c in range(len(CLASSES)):
        inter = ((predicted == c) & (labels == c)).sum().item()
        union = ((predicted == c) | (labels == c)).sum().item()
        ious.append(inter / union if union else 1.0)
    accuracy = (predicted == labels).float().mean().item()
    return 100 * accuracy, 100 * sum(ious) / len(ious), 100 * ious[1]


def _policies(backbone: torch.nn.Module) -> list[fxprune.Policy]:
    policies = []
    for fraction in (0.85, 0.70, 0.55):
        policies += [fxprune.EViT(keep_rate_for(backbone, fxprune.EViT, LAYERS, fraction), LAYERS),
                     fxprune.TopK(keep_rate_for(backbone, fxprune.TopK, LAYERS, fraction), LAYERS),
                     fxprune.ToMe(tome_r_for(backbone, fraction))]
    return policies + [fxprune.ClusTR(m) for m in (32, 16, 8)]


def _picture(path: str, images: torch.Tensor, masks: dict[str, torch.Tensor], scale: int = 3) -> None:
    """The scenes (rows) and, per column, the mask each model's features give (digit red, distractor blue)."""
    from PIL import Image

    colours = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.2, 0.2], [0.2, 0.4, 1.0]])
    size, grid = images.shape[-1], 8
    columns = [images] + [
        0.4 * images + 0.6 * colours[mask.view(-1, grid, grid)].permute(0, 3, 1, 2).repeat_interleave(
            size // grid, 2).repeat_interleave(size // grid, 3) for mask in masks.values()]
    rows = torch.cat([torch.cat(list(column), dim=1) for column in columns], dim=2)  # [3, n·S, (k+1)·S]
    pixels = (rows.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000, help="training scenes for the probe")
    parser.add_argument("--test", type=int, default=500, help="test scenes")
    parser.add_argument("--picture", help="write the predicted masks of 4 test scenes (dense, then a few methods)")
    args = parser.parse_args(argv)
    backbone = digits_vit()
    backbone.reset_classifier(0, "")
    train_images, train_labels = _scenes("train", args.train, seed=11)
    test_images, test_labels = _scenes("test", args.test, seed=1)
    probe = _train_probe(_features(backbone, train_images), train_labels)
    print(f"Command: `python benchmarks/dense_probe.py --train {args.train} --test {args.test}`  ")
    print(f"Machine: {machine()}  ")
    share = torch.bincount(test_labels.flatten(), minlength=3) / test_labels.numel()
    print(f"A linear probe on the dense digits ViT's patch features ({args.train} training scenes); {args.test} test "
          "scenes, " + ", ".join(f"{100 * s:.0f}% {c}" for c, s in zip(CLASSES, share)) + " patches.\n")
    print("| features | MACs (% of dense) | patch accuracy % | mIoU % | digit IoU % |")
    print("|---|---|---|---|---|")
    dense = _predict(probe, _features(backbone, test_images))
    print("| dense | 100.0 | {:.1f} | {:.1f} | {:.1f} |".format(*_scores(dense, test_labels)))
    masks = {"dense": ("dense", dense[:4])}
    dense_macs = fxprune.flops(backbone, test_images[:1])
    for policy in _policies(backbone):
        reduced = fxprune.transform(backbone, policy)
        predicted = _predict(probe, _features(reduced, test_images))
        macs = 100 * fxprune.flops(reduced, test_images[:1]) / dense_macs
        print(f"| {policy.describe()} | {macs:.1f} | " + " | ".join(f"{v:.1f}" for v in _scores(predicted,
                                                                                                   test_labels)) + " |")
        if type(policy) in (fxprune.TopK, fxprune.ToMe, fxprune.ClusTR):  # the last, fewest MACs, of each
            masks[type(policy).__name__] = (policy.describe(), predicted[:4])
    if args.picture:
        _picture(args.picture, test_images[:4], {name: mask for name, mask in masks.values()})
        print(f"\nwrote {args.picture}: 4 test scenes, then the probe's masks (digit red, distractor blue) from: "
              + ", ".join(name for name, _ in masks.values()))


if __name__ == "__main__":
    main()
