"""Train the ViT that fxprune ships (``fxprune.models.digits_vit``) on DigitScenes.

    python examples/train_digits_vit.py                 # about 26 minutes on a 2-core CPU
    python examples/train_digits_vit.py --steps 20      # a smoke run

Scenes are generated once into a pool (uint8, train split's source digits only), then the model is
trained with AdamW and a cosine schedule on standardised pixels, the standardisation is folded into
the patch embedding (so the saved model takes DigitScenes images in [0, 1]), it is evaluated on test
scenes (held-out source digits), and saved in float16 with its test accuracy.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fxprune.tools.datasets import DigitScenes
from fxprune.tools.models import DIGITS_VIT, DIGITS_VIT_WEIGHTS, digits_vit

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "fxprune" / "tools" / "weights" / DIGITS_VIT_WEIGHTS


def scene_pool(split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` scenes as uint8 ``[n, 3, 64, 64]`` and their labels ``[n]``."""
    data = DigitScenes(split, n, seed=seed)
    images = torch.empty(n, 3, 64, 64, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.long)
    for i in tqdm(range(n), desc=f"{split} scenes", unit="scene", mininterval=2):
        image, labels[i] = data[i]
        images[i] = (image * 255).round().to(torch.uint8)
    return images, labels


def as_input(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


@torch.no_grad()
def fold_standardisation(model: torch.nn.Module, mean: float, std: float) -> None:
    """Make ``model(x)`` equal what it computed on ``(x - mean) / std``: rescale the patch embedding."""
    proj = model.patch_embed.proj
    proj.bias -= proj.weight.sum(dim=(1, 2, 3)) * mean / std
    proj.weight /= std


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    correct = sum(
        (model(as_input(images[i : i + batch])).argmax(-1) == labels[i : i + batch]).sum().item()
        for i in range(0, len(images), batch)
    )
    return correct / len(images)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    drop_path: float,
    seed: int,
    device: str = "cpu",
) -> torch.nn.Module:
    """A fresh DigitScenes ViT trained on uint8 ``images`` ``[P, 3, 64, 64]``, returned on the CPU in eval mode.

    The model sees standardised pixels while training; the standardisation is folded into its patch
    embedding before it is returned, so it takes images in ``[0, 1]``.
    """
    torch.manual_seed(seed)
    sample = as_input(images[:4096])
    mean, std = sample.mean().item(), sample.std().item()
    model = digits_vit(pretrained=False, drop_path_rate=drop_path).train().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(images), generator=generator), 0
    progress = tqdm(range(steps), desc="training", unit="step", mininterval=5)
    for step in progress:
        if cursor + batch > len(images):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        index = order[cursor : cursor + batch]
        cursor += batch
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=min(300, steps // 10 + 1))
        x = (as_input(images[index].to(device)) - mean) / std
        loss = F.cross_entropy(model(x), labels[index].to(device), label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}")
    model = model.cpu().eval()
    fold_standardisation(model, mean, std)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=11_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pool", type=int, default=96_000, help="training scenes generated once")
    parser.add_argument("--test", type=int, default=2_000, help="test scenes for the final accuracy")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth while training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    start = time.time()
    train_x, train_y = scene_pool("train", args.pool, seed=args.seed)
    test_x, test_y = scene_pool("test", args.test, seed=args.seed + 1)
    model = train(train_x, train_y, args.steps, args.batch, args.lr, args.drop_path, args.seed, args.device)
    test_accuracy = accuracy(model, test_x, test_y)
    minutes = (time.time() - start) / 60
    print(f"test accuracy {test_accuracy:.4f} on {args.test} scenes of held-out digits; {minutes:.1f} min in all")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() for k, v in model.state_dict().items()}
    torch.save(
        {"model": state, "config": DIGITS_VIT, "test_accuracy": test_accuracy, "steps": args.steps, "seed": args.seed},
        args.out,
    )
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
