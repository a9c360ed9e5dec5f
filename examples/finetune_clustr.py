"""Fine-tune the shipped digits ViT after replacing its attention with ClusTR, distilling from the dense model.

    python examples/finetune_clustr.py                        # ClusTR(16) in every block, 300 steps
    python examples/finetune_clustr.py --clusters 8,32 --steps 50

ClusTR off the shelf changes the outputs (each query sees cluster means instead of every key). The
rewritten model is an ordinary module with its own copy of the weights (``copy_weights=True``), so it
trains like any other: cross-entropy on DigitScenes training scenes plus a KL term towards the dense
model's predictions. Prints test accuracy (held-out source digits) before and after, and the time taken.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import fxprune
from fxprune.tools.datasets import DigitScenes
from fxprune.tools.models import digits_vit
from fxprune.tools.speed import machine


def scenes(split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = DigitScenes(split, n, seed=seed)
    pairs = [data[i] for i in tqdm(range(n), desc=f"{split} scenes", unit="scene", leave=False, mininterval=2)]
    return torch.stack([image for image, _ in pairs]), torch.tensor([label for _, label in pairs])


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 250) -> float:
    model.eval()
    hits = sum((model(images[i : i + batch]).argmax(-1) == labels[i : i + batch]).sum().item()
               for i in range(0, len(images), batch))
    return hits / len(images)


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
    torch.manual_seed(0)
    start = time.perf_counter()
    teacher = digits_vit()
    student = fxprune.transform(teacher, policy, copy_weights=True)
    train_x, train_y = scenes("train", args.train_scenes, seed=11)
    test_x, test_y = scenes("test", args.test_scenes, seed=0)
    dense, before = accuracy(teacher, test_x, test_y), accuracy(student, test_x, test_y)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    losses = []
    for _ in tqdm(range(args.steps), desc="fine-tuning", unit="step"):
        pick = torch.randint(len(train_x), (args.batch,))
        x, y = train_x[pick], train_y[pick]
        with torch.no_grad():
            target = teacher(x).log_softmax(-1)
        student.train()
        out = student(x)
        loss = F.cross_entropy(out, y) + F.kl_div(out.log_softmax(-1), target, log_target=True, reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = accuracy(student, test_x, test_y)
    first, last = sum(losses[:20]) / len(losses[:20]), sum(losses[-20:]) / len(losses[-20:])
    print(f"Command: `python examples/finetune_clustr.py --clusters {args.clusters} --steps {args.steps}`  ")
    print(f"Machine: {machine()}  ")
    print(f"{policy.describe()} in every block of digits_vit; {args.steps} steps of batch {args.batch}; "
          f"{args.test_scenes} test scenes; {(time.perf_counter() - start) / 60:.1f} min in all.\n")
    print("| dense top-1 | ClusTR off the shelf | after fine-tuning | loss, first 20 steps → last 20 |")
    print("|---|---|---|---|")
    print(f"| {100 * dense:.2f}% | {100 * before:.2f}% | {100 * after:.2f}% | {first:.3f} → {last:.3f} |")


if __name__ == "__main__":
    main()
