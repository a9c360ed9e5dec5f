"""Evaluation harness: top-1 accuracy, mean MACs per image and measured speed ratio, for several policies
(their settings are chosen by :mod:`fxprune.tools.search`).

The embedded default is the DigitScenes ViT on DigitScenes test scenes (nothing to download). The same
harness runs a timm model (``pretrained=True`` where weights can be downloaded) on an ImageFolder in
ImageNet-val layout with timm's evaluation transforms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..capture import reusing_captures
from ..counting import MacCounter
from ..methods import method_of
from ..pipeline import transform
from ..policies import Compose, Policy
from .distributed import gather_over_processes, process_group
from .speed import interleaved, machine

__all__ = ["BenchRow", "BenchResult", "predict", "top1", "evaluate", "per_image_macs", "run", "imagefolder", "plot"]


@dataclasses.dataclass
class BenchRow:
    """One model of a benchmark: accuracy, mean MACs per image, relative output error and speed against
    the dense model (error: ``‖logits − dense logits‖ / ‖dense logits‖`` over all images)."""

    name: str
    accuracy: float
    macs: float
    mac_fraction: float
    speed_ratio: float
    policy: Policy | Compose | None = None
    error: float = 0.0


@dataclasses.dataclass
class BenchResult:
    """Rows for the dense model and each policy, with what was measured and where."""

    model: str
    data: str
    images: int
    speed_batch: int
    repeats: int
    machine: str
    rows: list[BenchRow]

    def markdown(self) -> str:
        lines = [
            f"Model: {self.model}; data: {self.data} ({self.images} images).  ",
            f"Speed: eager, batch {self.speed_batch}, ratio of medians of {self.repeats} interleaved runs "
            f"against the dense model; machine: {self.machine}.",
            "",
            "| method | top-1 (%) | Δ top-1 | output error | MACs / image | % of dense MACs | speed ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        dense = self.rows[0].accuracy
        for r in self.rows:
            delta = "" if r.policy is None else f"{100 * (r.accuracy - dense):+.2f}"
            error = "" if r.policy is None else f"{r.error:.3f}"
            lines.append(
                f"| {r.name} | {100 * r.accuracy:.2f} | {delta} | {error} | {r.macs / 1e6:.1f} M | "
                f"{100 * r.mac_fraction:.1f} | {r.speed_ratio:.2f}× |"
            )
        return "\n".join(lines)

    __str__ = markdown


def predict(model: nn.Module, loader: Iterable, progress: str | None = None) -> tuple[Tensor, Tensor, float]:
    """(logits ``[images, classes]``, labels, mean MACs per image) of ``model`` over ``loader``."""
    outputs, targets = [], []
    counter = MacCounter()
    batches = tqdm(loader, desc=progress, unit="batch", leave=False) if progress else loader
    with torch.no_grad(), counter:  # not inference_mode: dispatch modes do not see its ops
        for images, labels in batches:
            output = model(images)
            outputs.append(output if isinstance(output, Tensor) else output.logits)
            targets.append(labels)
    logits, labels = torch.cat(outputs), torch.cat(targets)
    return logits, labels, counter.total / len(labels)


def top1(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows of ``logits`` ``[images, classes]`` whose largest entry is the ``labels`` class."""
    return (logits.argmax(-1) == labels).float().mean().item()


def evaluate(model: nn.Module, loader: Iterable, progress: str | None = None) -> tuple[float, float]:
    """(top-1 accuracy, mean MACs per image) of ``model`` over ``loader``'s ``(images, labels)`` batches."""
    logits, labels, macs = predict(model, loader, progress)
    return top1(logits, labels), macs


def per_image_macs(model: nn.Module, images: Tensor, progress: str | None = None) -> float:
    """Mean MACs of ``model`` over ``images`` ``[M, ...]``, each image run alone: what each costs by itself
    (a method that keeps a different number of tokens per image pads a batch to its largest count)."""
    counter = MacCounter()
    rows = tqdm(images, desc=progress, unit="image", leave=False) if progress else images
    with torch.no_grad(), counter:
        for image in rows:
            model(image[None])
    return counter.total / len(images)


def _per_image(policy: Policy | Compose | None) -> bool:
    """Whether what an image costs under ``policy`` depends on the image (counted one image at a time)."""
    return policy is not None and any(method_of(part).cost_per_image for part in policy.policies())


def _describe(policy: Policy | Compose) -> str:
    """``"<method> @ <blocks>"`` for each part of ``policy``."""

    def one(part: Policy) -> str:
        layers = "every block" if part.layers is None else ",".join(map(str, part.layers))
        return f"{part.describe()} @ {layers}"

    return " | ".join(one(part) for part in policy.policies())


def run(
    model: nn.Module,
    policies: Sequence[Policy | Compose],
    dataset: Dataset,
    *,
    batch_size: int = 100,
    speed_batch: int = 32,
    repeats: int = 5,
    model_name: str | None = None,
    data_name: str | None = None,
    progress: bool = True,
) -> BenchResult:
    """Evaluate ``model`` dense and transformed by each policy on ``dataset``, and time them together. Under
    ``torchrun`` each process evaluates its share of the images (contiguous, in order) and the results are
    combined; rank 0 measures the speed."""
    rank, world = process_group()
    share = Subset(dataset, range(rank * len(dataset) // world, (rank + 1) * len(dataset) // world))
    loader = DataLoader(share if world > 1 else dataset, batch_size=batch_size, shuffle=False)
    example = next(iter(loader))[0][:2]
    models: dict[str, tuple[nn.Module, Policy | Compose | None]] = {"dense": (model, None)}
    with reusing_captures():  # the model is captured once for every policy
        for policy in policies:
            models[_describe(policy)] = (transform(model, policy, example_inputs=(example,)), policy)
    rows, dense = [], None
    per_image = any(_per_image(policy) for _, policy in models.values())
    images = torch.cat([x for x, _ in loader]) if per_image else None  # run one by one for their MACs
    for name, (candidate, policy) in models.items():
        logits, labels, macs = predict(candidate, loader, progress=name if progress and rank == 0 else None)
        if _per_image(policy):
            macs = per_image_macs(candidate, images, progress=f"{name}: MACs per image" if progress else None)
        shares = gather_over_processes((logits, labels, macs * len(labels)), world)
        logits, labels = torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares])
        macs = sum(s[2] for s in shares) / len(labels)
        dense = logits if dense is None else dense
        error = ((logits - dense).norm() / dense.norm()).item()
        rows.append(BenchRow(name, top1(logits, labels), macs, 0.0, 0.0, policy, error))
    for row in rows:
        row.mac_fraction = row.macs / rows[0].macs
    if rank == 0:
        speed_images = torch.cat([x for x, _ in _take(loader, speed_batch)])[:speed_batch]
        timing = interleaved({n: (lambda m=m: m(speed_images)) for n, (m, _) in models.items()}, repeats=repeats)
        for row in rows:
            row.speed_ratio = timing.ratio("dense", row.name)
    if world > 1:
        torch.distributed.barrier()
    return BenchResult(
        model_name or type(model).__name__, data_name or type(dataset).__name__, len(dataset), speed_batch,
        repeats, machine(), rows,
    )


def _take(loader: DataLoader, images: int):
    seen = 0
    for batch in loader:
        yield batch
        seen += len(batch[1])
        if seen >= images:
            return


def imagefolder(model: nn.Module, root: str | Path) -> Dataset:
    """An ImageFolder (ImageNet-val layout: one folder per class) with timm's eval transforms for ``model``."""
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    config = resolve_data_config({}, model=model)
    return ImageFolder(str(root), transform=create_transform(**config, is_training=False))


def plot(result: BenchResult, path: str | Path) -> None:
    """Accuracy against MACs (% of dense), one curve per method, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = result.rows[0]
    curves: dict[str, list[BenchRow]] = {}
    for row in result.rows[1:]:
        key = row.policy.curve() if isinstance(row.policy, Policy) else row.policy.describe()
        curves.setdefault(key, []).append(row)
    figure, axes = plt.subplots(figsize=(6, 4.2), dpi=120)
    for key, rows in curves.items():
        rows = sorted(rows, key=lambda r: r.mac_fraction) + [dense]
        axes.plot([100 * r.mac_fraction for r in rows], [100 * r.accuracy for r in rows], marker="o", label=key)
    axes.scatter([100], [100 * dense.accuracy], marker="*", s=160, color="black", zorder=3, label="dense")
    axes.set_xlabel("MACs per image (% of dense)")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title(f"{result.model} on {result.data}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
