"""Fine-tune the shipped digits ViT after replacing its attention with ClusTR, distilling from the dense model.

    python examples/finetune_clustr.py                        # ClusTR(16) in every block, 300 steps
    python examples/finetune_clustr.py --clusters 8,32 --steps 50

ClusTR off the shelf changes the outputs (each query sees cluster means instead of every key). The
rewritten model is an ordinary module with its own copy of the weights, so it trains like any other: this is
one call of ``fxprune.train`` (cross-entropy on DigitScenes training scenes plus a KL term towards the dense
model's predictions, AdamW with warm-up and cosine decay). Prints test accuracy (held-out source digits)
before and after, and the time taken.
"""

from __future__ import annotations

import argparse
import time

import torch

import fxprune
from fxprune.tools.bench import evaluate
from fxprune.tools.datasets import DigitScenes
from fxprune.tools.models import digits_vit
from fxprune.tools.speed import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", default="16", help="one count, or one per head group (multi-scale)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--train-scenes", type=int, default=6000)
    parser.add_argument("--test-scenes", type=int, default=1000)
    args = parser.parse_args()
    counts = tuple(int(m) for m in args.clusters.split(","))
    policy = fxprune.ClusTR(counts[0] if len(counts) == 1 else counts)
    start = time.perf_counter()
    teacher = digits_vit()
    test = DigitScenes("test", args.test_scenes, seed=0)
    loader = torch.utils.data.DataLoader(test, batch_size=250)
    dense = evaluate(teacher, loader)[0]
    before = evaluate(fxprune.transform(teacher, policy), loader)[0]
    config = fxprune.TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr)
    result = fxprune.train(teacher, policy, DigitScenes("train", args.train_scenes, seed=11), config, eval_data=test)
    after = result.evaluations[-1][1]
    first, last = (sum(part) / len(part) for part in (result.losses[:20], result.losses[-20:]))
    print(f"Command: `python examples/finetune_clustr.py --clusters {args.clusters} --steps {args.steps}`  ")
    print(f"Machine: {machine()}  ")
    print(f"{policy.describe()} in every block of digits_vit; {args.steps} steps of batch {args.batch}; "
          f"{args.test_scenes} test scenes; {(time.perf_counter() - start) / 60:.1f} min in all.\n")
    print("| dense top-1 | ClusTR off the shelf | after fine-tuning | loss, first 20 steps → last 20 |")
    print("|---|---|---|---|")
    print(f"| {100 * dense:.2f}% | {100 * before:.2f}% | {100 * after:.2f}% | {first:.3f} → {last:.3f} |")


if __name__ == "__main__":
    main()
