"""ClusTR off the shelf: output error against dense attention, by clustering, cluster count and Lloyd iterations.

    python benchmarks/clustr_error.py --clusters 32,16,8,4 --iterations 0,1,3 --images 1000
    python benchmarks/clustr_error.py --model deit_small_patch16_224 --clusters 49,16 --iterations 0,3 --images 16

ClusTR in every block, with each ``--clustering`` (DPC-KNN, k-means from farthest-point seeds) followed by
each number of Lloyd iterations. The output error is ``‖logits − dense logits‖ / ‖dense logits‖`` over
all images. ``--model digits_vit`` (the default): the embedded digits ViT (trained weights) on DigitScenes
test scenes, with top-1 accuracy. A timm model name: that model at 224² with timm's random
initialisation (seed 0), on three kinds of input: Gaussian noise, DigitScenes scenes resized to 224²,
and smooth random images (7×7 Gaussian noise upsampled bicubically), the last two ImageNet-normalised.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

import fxprune
from fxprune.tools.bench import predict, top1
from fxprune.tools.datasets import DigitScenes
from fxprune.tools.models import digits_vit
from fxprune.tools.speed import machine

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # ImageNet's


def _normalised(images: Tensor) -> Tensor:
    return (images - MEAN[:, None, None]) / STD[:, None, None]


def timm_inputs(images: int, size: int = 224) -> dict[str, Tensor]:
    """The three kinds of input for a randomly initialised timm model, ``[images, 3, size, size]`` each."""
    generator = torch.Generator().manual_seed(0)
    scenes = torch.stack([DigitScenes("test", images)[i][0] for i in range(images)])
    smooth = torch.randn(images, 3, 7, 7, generator=generator)
    smooth = F.interpolate(smooth, size=size, mode="bicubic", align_corners=False)
    smooth = (smooth - smooth.mean()) / smooth.std() * 0.25 + 0.5
    return {
        "Gaussian noise": torch.randn(images, 3, size, size, generator=generator),
        "DigitScenes resized": _normalised(F.interpolate(scenes, size=size, mode="bilinear", align_corners=False)),
        "smooth images": _normalised(smooth.clamp(0, 1)),
    }


def error(logits: Tensor, dense: Tensor) -> float:
    return ((logits - dense).norm() / dense.norm()).item()


def policies(args: argparse.Namespace) -> list[fxprune.ClusTR]:
    settings = itertools.product(args.clustering.split(","), args.clusters.split(","), args.iterations.split(","))
    return [fxprune.ClusTR(int(m), iterations=int(i), clustering=c) for c, m, i in settings]


def digits_table(args: argparse.Namespace) -> None:
    model = digits_vit()
    loader = DataLoader(DigitScenes("test", args.images), batch_size=100)
    dense, labels, dense_macs = predict(model, loader)
    print(f"digits_vit on {args.images} DigitScenes test scenes, ClusTR in every block; dense top-1 "
          f"{100 * top1(dense, labels):.2f}%, {dense_macs / 1e6:.1f} M MACs / image.\n")
    print("| clustering | clusters M | Lloyd iterations | MACs / image | output error | top-1 (%) |")
    print("|---|---|---|---|---|---|")
    for policy in policies(args):
        logits, _, macs = predict(fxprune.transform(model, policy), loader)
        print(f"| {policy.clustering} | {policy.num_clusters} | {policy.iterations} | {macs / 1e6:.1f} M | "
              f"{error(logits, dense):.3f} | {100 * top1(logits, labels):.2f} |")


def _logits(model: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(batch) for batch in images.split(8)])


def timm_table(args: argparse.Namespace) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    inputs = timm_inputs(args.images)
    dense = {kind: _logits(model, images) for kind, images in inputs.items()}
    example = inputs["Gaussian noise"][:1]
    print(f"{args.model} (timm's random initialisation, seed 0) at 224², ClusTR in every block; {args.images} "
          f"images of each kind; dense {fxprune.flops(model, example) / 1e9:.2f} G MACs / image. "
          "Each cell: output error.\n")
    print("| clustering | clusters M | Lloyd iterations | MACs / image | " + " | ".join(inputs) + " |")
    print("|---|---|---|---|" + "---|" * len(inputs))
    for policy in policies(args):
        gm = fxprune.transform(model, policy)
        errors = [f"{error(_logits(gm, images), dense[kind]):.4f}" for kind, images in inputs.items()]
        print(f"| {policy.clustering} | {policy.num_clusters} | {policy.iterations} | "
              f"{fxprune.flops(gm, example) / 1e9:.2f} G | " + " | ".join(errors) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits_vit", help="digits_vit, or a timm model name (random weights)")
    parser.add_argument("--clustering", default="dpc,kmeans")
    parser.add_argument("--clusters", default="32,16,8,4")
    parser.add_argument("--iterations", default="0,1,3")
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    model = "" if args.model == "digits_vit" else f" --model {args.model}"
    print(f"Command: `python benchmarks/clustr_error.py{model} --clustering {args.clustering} "
          f"--clusters {args.clusters} --iterations {args.iterations} --images {args.images}`  ")
    print(f"Machine: {machine()}  ")
    if args.model == "digits_vit":
        digits_table(args)
    else:
        timm_table(args)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
