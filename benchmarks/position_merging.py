"""Merged rows on a relative-position ViT: what giving a row that stands for several patches one patch's position
(and a cluster of keys the log-summed bias of its members) costs in accuracy.

    python benchmarks/position_merging.py                    # fine-tunes the variant first (about 2 minutes)
    python benchmarks/position_merging.py --weights relpos.pt

The variant is the digits ViT with a learned relative position bias in every block
(``fxprune.tools.models.digits_vit_relpos``: the shipped weights, zero bias tables), fine-tuned densely with
``fxprune train`` (a Top-K policy that keeps every token) so that its bias tables are used. After a reduction every
later block takes its bias at the rows' positions; a ToMe merge takes its destination's, EViT's fused token its
heaviest dropped token's (docs/methods.md). Each method runs off the shelf on the plain digits ViT and on the
variant at the same settings: the gap between the two drops is what the position definition costs, beside Top-K
(EViT without the fused token: every row keeps its own position). ClusTR (every block) keeps every row, but its
clusters stand for several keys: each query's bias to a cluster is the log-sum of its members' exponentiated
biases. Top-1 on ``--images`` DigitScenes test scenes; MACs per image from the plan.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import fxprune
from fxprune.tools.bench import evaluate
from fxprune.tools.cli import main as fxprune_main
from fxprune.tools.datasets import DigitScenes
from fxprune.tools.models import digits_vit, digits_vit_relpos
from fxprune.tools.speed import machine

FINE_TUNE = ["train", "--model", "digits-relpos", "--policy", "topk:keep=1,layers=1", "--steps", "600",
             "--batch", "64", "--lr", "1e-4", "--train-images", "20000", "--images", "500", "--eval-every", "300"]
POLICIES = ["tome:r=4", "tome:r=6", "tome:r=8", *(f"{method}:keep={keep},layers=1,3,4" for keep in (0.7, 0.5, 0.35)
                                                   for method in ("evit", "topk")),
            "clustr:m=32", "clustr:m=16", "clustr:m=8"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="digits_relpos.pt",
                        help="the fine-tuned variant (written by the fine-tuning run when missing)")
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args(argv)
    if not Path(args.weights).exists():
        command = [*FINE_TUNE, "--out", f"{args.weights}.ckpt", "--weights-out", args.weights]
        print(f"Fine-tuning: `fxprune {' '.join(command)}`\n")
        fxprune_main(command)
    data = DigitScenes("test", args.images, seed=1)
    loader = torch.utils.data.DataLoader(data, batch_size=250)
    models = {"digits ViT": digits_vit(), "relative-bias variant": digits_vit_relpos(weights=args.weights)}
    print(f"\nCommand: `python benchmarks/position_merging.py --weights {args.weights} --images {args.images}`  ")
    print(f"Machine: {machine()}  ")
    print(f"Top-1 on {args.images} DigitScenes test scenes; MACs per image; Δ against the same model dense.\n")
    print("| policy | " + " | ".join(f"{name}: MACs (M) | top-1 % | Δ" for name in models) + " | Δ gap |")
    print("|---|" + "---|---|---|" * len(models) + "---|")
    dense = {name: 100 * evaluate(model, loader)[0] for name, model in models.items()}
    print("| dense | " + " | ".join(f"{fxprune.flops(model, torch.zeros(1, 3, 64, 64)) / 1e6:.1f} | "
                                     f"{dense[name]:.2f} | – " for name, model in models.items()) + " | – |")
    for text in POLICIES:
        policy = fxprune.parse_policy(text)
        cells, drops = [], []
        for name, model in models.items():
            reduced = fxprune.transform(model, policy)
            accuracy = 100 * evaluate(reduced, loader)[0]
            drops.append(accuracy - dense[name])
            cells.append(f"{reduced.fxprune_plan.macs_after / 1e6:.1f} | {accuracy:.2f} | {drops[-1]:+.2f}")
        print(f"| {policy.describe()} | " + " | ".join(cells) + f" | {drops[1] - drops[0]:+.2f} |")


if __name__ == "__main__":
    main()
