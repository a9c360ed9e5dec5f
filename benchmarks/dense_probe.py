"""Patch features of a reduced ViT under a dense head: a linear probe on DigitScenes patch labels.

    python benchmarks/dense_probe.py                      # about two minutes on 2 CPU cores

The digits ViT as a backbone (``reset_classifier(0, "")``: its output is every token, ``[B, 65, 64]``). Each 8×8
patch of a scene is labelled digit ink, distractor or background (``Scene.patch_labels``: at least an eighth of
its pixels). A linear probe is trained on the *dense* model's frozen patch features of ``--train`` training scenes,
then applied unchanged to the patch features each method gives on ``--test`` test scenes, with the original token
layout restored (fxprune's default for a dense output): kept and merged tokens take the row that holds them, a
dropped token (EViT's fused ones too) its state where its block dropped it. EViT, Top-K (blocks 1, 3, 4) and ToMe
(every block) are fitted to 85%, 70% and 55% of the dense MACs; ClusTR (every block, which keeps every token)
at 32, 16 and 8 clusters of 64 patches. Reported: patch accuracy, the mean over the three classes of the
intersection over union (mIoU), and the IoU of the digit class. The picture of a few scenes' predicted masks comes
from ``fxprune show --dense`` (the same probe, ``fxprune.tools.probe``).
"""

from __future__ import annotations

import argparse

import torch

import fxprune
from fxprune.tools.models import digits_vit
from fxprune.tools.probe import (
    CLASSES,
    TEST_SEED,
    TRAIN_SEED,
    fit_probe,
    labelled_scenes,
    mask_scores,
    patch_features,
)
from fxprune.tools.search import keep_rate_for, tome_r_for
from fxprune.tools.speed import machine

LAYERS = (1, 3, 4)


def _policies(backbone: torch.nn.Module) -> list[fxprune.Policy]:
    policies = []
    for fraction in (0.85, 0.70, 0.55):
        policies += [fxprune.EViT(keep_rate_for(backbone, fxprune.EViT, LAYERS, fraction), LAYERS),
                     fxprune.TopK(keep_rate_for(backbone, fxprune.TopK, LAYERS, fraction), LAYERS),
                     fxprune.ToMe(tome_r_for(backbone, fraction))]
    return policies + [fxprune.ClusTR(m) for m in (32, 16, 8)]


def _row(name: str, macs: float, predicted: torch.Tensor, labels: torch.Tensor) -> str:
    scores = mask_scores(predicted, labels)
    return f"| {name} | {macs:.1f} | {scores.accuracy:.1f} | {scores.miou:.1f} | {scores.digit_iou:.1f} |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000, help="training scenes for the probe")
    parser.add_argument("--test", type=int, default=500, help="test scenes")
    args = parser.parse_args(argv)
    backbone = digits_vit()
    backbone.reset_classifier(0, "")
    train_images, train_labels = labelled_scenes("train", args.train, seed=TRAIN_SEED)
    test_images, test_labels = labelled_scenes("test", args.test, seed=TEST_SEED)
    probe = fit_probe(patch_features(backbone, train_images, 1), train_labels)
    print(f"Command: `python benchmarks/dense_probe.py --train {args.train} --test {args.test}`  ")
    print(f"Machine: {machine()}  ")
    share = torch.bincount(test_labels.flatten(), minlength=3) / test_labels.numel()
    print(f"A linear probe on the dense digits ViT's patch features ({args.train} training scenes); {args.test} test "
          "scenes, " + ", ".join(f"{100 * s:.0f}% {c}" for c, s in zip(CLASSES, share)) + " patches.\n")
    print("| features | MACs (% of dense) | patch accuracy % | mIoU % | digit IoU % |")
    print("|---|---|---|---|---|")
    print(_row("dense", 100.0, probe.predict(patch_features(backbone, test_images, 1)), test_labels))
    dense_macs = fxprune.flops(backbone, test_images[:1])
    for policy in _policies(backbone):
        reduced = fxprune.transform(backbone, policy)
        macs = 100 * fxprune.flops(reduced, test_images[:1]) / dense_macs
        print(_row(policy.describe(), macs, probe.predict(patch_features(reduced, test_images, 1)), test_labels))


if __name__ == "__main__":
    main()
