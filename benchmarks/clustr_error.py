"""ClusTR off the shelf: output error against dense attention and accuracy, by cluster count and k-means iterations.

    python benchmarks/clustr_error.py --clusters 32,16,8,4 --iterations 0,1,3,5 --images 1000

On the embedded digits ViT (trained weights, DigitScenes test scenes), ClusTR in every block. Error is
``‖logits − dense logits‖ / ‖dense logits‖`` over all images; 0 iterations is the grid partition alone.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

import fxprune
from fxprune.bench import predict, top1
from fxprune.datasets import DigitScenes
from fxprune.models import digits_vit
from fxprune.speed import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", default="32,16,8,4")
    parser.add_argument("--iterations", default="0,1,3,5")
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    clusters = [int(m) for m in args.clusters.split(",")]
    iterations = [int(i) for i in args.iterations.split(",")]
    model = digits_vit()
    loader = DataLoader(DigitScenes("test", args.images), batch_size=100)
    dense, labels, _ = predict(model, loader)
    print(f"Command: `python benchmarks/clustr_error.py --clusters {args.clusters} --iterations {args.iterations} "
          f"--images {args.images}`  ")
    print(f"Machine: {machine()}  ")
    print(f"digits_vit on {args.images} DigitScenes test scenes, ClusTR in every block; dense top-1 "
          f"{100 * top1(dense, labels):.2f}%. Each cell: output error / top-1 (%).\n")
    print("| clusters M | " + " | ".join(f"{i} iterations" for i in iterations) + " |")
    print("|---|" + "---|" * len(iterations))
    for m in clusters:
        cells = []
        for i in iterations:
            logits, _, _ = predict(fxprune.transform(model, fxprune.ClusTR(m, iterations=i)), loader)
            error = ((logits - dense).norm() / dense.norm()).item()
            cells.append(f"{error:.3f} / {100 * top1(logits, labels):.2f}")
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
