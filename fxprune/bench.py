"""Evaluation harness: top-1 accuracy, mean MACs per image and measured speed ratio, for several policies.

The embedded default is the DigitScenes ViT on DigitScenes test scenes (nothing to download). The same
harness runs a timm model (``pretrained=True`` where weights can be downloaded) on an ImageFolder in
ImageNet-val layout with timm's evaluation transforms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .analysis import analyse
from .flops import MacCounter
from .methods import Method, SweepContext, method_of, methods
from .methods.evit import EViT
from .methods.tome import ToMe
from .planning import Plan
from .policies import Compose, Policy
from .speed import interleaved, machine
from .transform import plan, rewrite, transform

__all__ = [
    "BenchRow", "BenchResult", "predict", "top1", "evaluate", "per_image_macs", "run", "fit_policy", "mac_fraction",
    "sweep_context", "fit_method", "keep_rate_for", "tome_r_for", "default_layers", "default_policy",
    "sweep_policies", "imagefolder", "plot",
]


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


def _pads(policy: Policy | Compose | None) -> bool:
    """Whether ``policy`` keeps a different number of tokens per image (its batches hold padding)."""
    return policy is not None and any(method_of(part).pads_tokens for part in policy.policies())


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
    """Evaluate ``model`` dense and transformed by each policy on ``dataset``, and time them together."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    example = next(iter(loader))[0][:2]
    models: dict[str, tuple[nn.Module, Policy | Compose | None]] = {"dense": (model, None)}
    for policy in policies:
        models[_describe(policy)] = (transform(model, policy, example_inputs=(example,)), policy)
    rows, dense = [], None
    padding = any(_pads(policy) for _, policy in models.values())
    images = torch.cat([x for x, _ in loader]) if padding else None  # run one by one for their MACs
    for name, (candidate, policy) in models.items():
        logits, labels, macs = predict(candidate, loader, progress=name if progress else None)
        if _pads(policy):
            macs = per_image_macs(candidate, images, progress=f"{name}: MACs per image" if progress else None)
        dense = logits if dense is None else dense
        error = ((logits - dense).norm() / dense.norm()).item()
        rows.append(BenchRow(name, top1(logits, labels), macs, 0.0, 0.0, policy, error))
    for row in rows:
        row.mac_fraction = row.macs / rows[0].macs
    speed_images = torch.cat([x for x, _ in _take(loader, speed_batch)])[:speed_batch]
    timing = interleaved({n: (lambda m=m: m(speed_images)) for n, (m, _) in models.items()}, repeats=repeats)
    for row in rows:
        row.speed_ratio = timing.ratio("dense", row.name)
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


def fit_policy(
    model: nn.Module,
    family: Callable[[Any], Policy],
    settings: Sequence[Any],
    fraction: float,
    example_inputs: Sequence[torch.Tensor] | None = None,
    calibration: Tensor | None = None,
) -> Policy:
    """``family(s)`` for the setting ``s`` that leaves the most MACs not above ``fraction`` of the dense MACs.

    ``settings`` must be ordered by increasing MACs (e.g. keep rates ascending, ToMe's ``r`` descending);
    found by bisection. The MACs are the plan's (one fast plan, checked at one batch size, per step), or,
    with ``calibration`` images ``[M, ...]``, their mean per image, each image run alone (for methods that
    keep a different number of tokens per image). When every setting exceeds ``fraction`` the first is
    returned, when none does the last.
    """

    def fraction_at(i: int) -> float:
        if calibration is not None:
            return mac_fraction(model, family(settings[i]), calibration, example_inputs)
        the_plan: Plan = plan(model, family(settings[i]), example_inputs, fast=True)
        return the_plan.macs_after / the_plan.macs_before

    low, high = 0, len(settings) - 1  # invariant: the answer lies in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fraction_at(middle) <= fraction else (low, middle - 1)
    return family(settings[low])


def mac_fraction(
    model: nn.Module, policy: Policy | Compose, images: Tensor, example_inputs: Sequence[torch.Tensor] | None = None
) -> float:
    """Mean MACs per image of ``model`` transformed by ``policy`` over ``images`` ``[M, ...]`` (each run alone), as
    a fraction of the dense model's."""
    dense = per_image_macs(model, images[:1])
    checked_once = rewrite(model, policy, example_inputs, copy_weights=False, second_batch=False)[0]
    return per_image_macs(checked_once, images) / dense


def sweep_context(
    model: nn.Module, layers: Sequence[int], example_inputs=None, calibration: Tensor | None = None
) -> SweepContext:
    """What the methods' bench settings are chosen from (:class:`~fxprune.methods.SweepContext`)."""
    program = analyse(model, example_inputs)
    return SweepContext(
        model, tuple(layers), len(program.blocks), program.tokens, program.prefix_tokens,
        program.blocks[0].attention.num_heads, example_inputs, calibration,
    )


def fit_method(method: Method, ctx: SweepContext, fraction: float, adaptive: bool = False) -> Policy:
    """``method``'s knob fitted to leave at most ``fraction`` of the dense MACs (``adaptive``: by the mean MACs per
    image on ``ctx.calibration``, for a method whose images keep different numbers of tokens)."""
    family = partial(method.knob.family, ctx)
    calibration = ctx.calibration if adaptive else None
    return fit_policy(ctx.model, family, method.knob.values(ctx), fraction, ctx.example_inputs, calibration)


def keep_rate_for(
    model: nn.Module, method: type[EViT], layers: Sequence[int], fraction: float, example_inputs=None
) -> float:
    """The keep rate (a multiple of 0.01) at which ``method(keep_rate, layers)`` leaves at most ``fraction``
    of the dense MACs, as close to it as possible."""
    ctx = sweep_context(model, layers, example_inputs)
    return fit_method(method_of(method), ctx, fraction).keep_rate


def tome_r_for(model: nn.Module, fraction: float, example_inputs=None) -> int:
    """The ``r`` at which ``ToMe(r)`` (every block) leaves at most ``fraction`` of the dense MACs, as close as
    possible."""
    return fit_method(method_of(ToMe), sweep_context(model, (), example_inputs), fraction).r


def default_layers(model: nn.Module, example_inputs=None) -> tuple[int, ...]:
    """Blocks to reduce by default: a quarter, half and three quarters deep (3, 6, 9 for 12 blocks, as EViT)."""
    depth = len(analyse(model, example_inputs).blocks)
    return tuple(sorted({depth // 4, depth // 2, 3 * depth // 4}))


def default_policy(model: nn.Module, fraction: float = 0.70, example_inputs=None) -> EViT:
    """EViT at :func:`default_layers`, keeping the tokens that leave ``fraction`` of the dense MACs."""
    layers = default_layers(model, example_inputs)
    return EViT(keep_rate_for(model, EViT, layers, fraction, example_inputs), layers)


def sweep_policies(
    model: nn.Module,
    layers: Sequence[int],
    fractions: Sequence[float] = (0.85, 0.70, 0.55),
    example_inputs=None,
    *,
    calibration: Tensor,
) -> list[Policy]:
    """Every registered method at the settings its spec gives ``fxprune bench``, in three groups:

    1. each method with a knob, fitted to leave (at most, as close as possible) each of ``fractions`` of the
       dense MACs (methods placed at a few blocks, at ``layers``);
    2. each adaptive method (images keep different numbers of tokens) fitted by its mean MACs per image on the
       ``calibration`` images, plus its extra settings, each setting once and followed by the methods of group
       1 placed at ``layers``, fitted to its MACs per image;
    3. each method's fixed settings.
    """
    ctx = sweep_context(model, layers, example_inputs, calibration)
    fitted = [m for m in methods() if m.knob is not None and not m.pads_tokens]
    adaptive = [m for m in methods() if m.knob is not None and m.pads_tokens]
    policies = [fit_method(method, ctx, f) for method in fitted for f in fractions]
    for method in adaptive:
        settings = [fit_method(method, ctx, f, adaptive=True) for f in fractions]
        settings += method.knob.extra(ctx) if method.knob.extra is not None else []
        for setting in dict.fromkeys(settings):
            fraction = mac_fraction(model, setting, calibration, example_inputs)
            policies += [setting] + [fit_method(m, ctx, fraction) for m in fitted if m.knob.at_layers]
    return policies + [policy for method in methods() if method.settings is not None for policy in method.settings(ctx)]


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
