"""Fine-tuning a transformed model with distillation from the original: one process, or many under ``torchrun``.

``fxprune.train(model, policy, data)`` transforms ``model`` with its own copy of the weights, then trains it:
AdamW with a linear warm-up and a cosine decay per step, two parameter groups (the learned parts a method adds,
``fxprune.*``, at ``lr``; the backbone at ``lr · backbone_lr_scale``, by default the method's recipe (DynamicViT
1/100, AdaViT 1), frozen for its first ``freeze_backbone`` steps), gradient clipping, a seeded data order,
periodic evaluation, checkpoints and resuming. The loss is the method's when it has one (DynamicViT:
:class:`~fxprune.losses.DynamicViTLoss`, AdaViT: :class:`~fxprune.losses.AdaViTLoss`), otherwise cross-entropy
plus ``distill_weight`` · KL(original ‖ transformed) on the logits (``distill_weight`` None: the method's default,
0.5 for that loss and DynamicViT's, 0 for AdaViT's).

EViT and Top-K can warm their keep rate up as the EViT paper does (``keep_warmup``): from 1 down to the policy's
along a cosine, stepping through ``keep_levels`` graphs that share the weights. A method whose loss pulls towards
a target usage (AdaViT) warms that target the same way (one graph; its loss's ``target`` follows the cosine).

Under ``torchrun --nproc_per_node=N`` (``WORLD_SIZE`` set) it runs distributed data parallel (gloo on the CPU,
nccl on GPUs): each process takes ``batch_size / N`` images of every global batch through a
``DistributedSampler``, starts from rank 0's weights, and averages the gradients over the processes after every
backward pass (an all-reduce, so any of the graphs can run); only rank 0 logs and writes checkpoints, and
metrics are averaged over the processes. The same global batch gives the same steps as one process.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from ..losses import distillation, frozen_copy, logits_of
from ..methods import method_of
from ..methods.evit import EViT
from ..ops.emitting import collect
from ..passes.learned import LEARNED_PREFIX
from ..pipeline import transform
from ..policies import Compose, Policy
from .distributed import mean_over_processes, process_group

__all__ = ["TrainConfig", "TrainResult", "train"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The recipe: ``steps`` optimiser steps of ``batch_size`` images (the global batch, over every process)."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-4
    backbone_lr_scale: float | None = None  # None: the learned method's recipe (DynamicViT 0.01, AdaViT 1), else 1
    freeze_backbone: int = 0  # steps at the start with the backbone frozen
    warmup: int = 20
    weight_decay: float = 0.05
    clip: float | None = 1.0
    distill_weight: float | None = None  # None: the method's default (see the module docstring)
    keep_warmup: int = 0  # steps over which the keep rate (EViT/Top-K) or target usage (AdaViT) falls from 1 (cosine)
    keep_levels: int = 4  # graphs the keep-rate warm-up steps through (each a transform sharing the weights)
    eval_every: int = 0  # 0: only at the end
    seed: int = 0
    workers: int = 0


@dataclasses.dataclass
class TrainResult:
    """The trained module, its loss per step, its evaluations ``(step, top-1)`` and the seconds its steps took
    (this run's, evaluations included, set-up not)."""

    model: nn.Module
    losses: list[float]
    evaluations: list[tuple[int, float]]
    seconds: float = 0.0


def _batches(data: Dataset, batch: int, rank: int, world: int, seed: int, workers: int) -> Iterator:
    """Endless batches of ``batch`` images of this process's share, reshuffled every pass (seeded)."""
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(data, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _groups(model: nn.Module, policy: Policy | Compose, config: TrainConfig) -> tuple[list[dict], float]:
    """Optimiser groups (learned parts, backbone) and the backbone's lr scale."""
    learned = [p for name, p in model.named_parameters() if name.startswith(LEARNED_PREFIX + ".")]
    backbone = [p for name, p in model.named_parameters() if not name.startswith(LEARNED_PREFIX + ".")]
    recipes = [method_of(part).learned.backbone_lr_scale for part in policy.policies() if method_of(part).learned]
    scale = config.backbone_lr_scale if config.backbone_lr_scale is not None else min(recipes, default=1.0)
    groups = [{"params": backbone, "lr_scale": scale}]
    if learned:
        groups.append({"params": learned, "lr_scale": 1.0})
    return groups, scale


def _lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _criterion(model: nn.Module, policy: Policy | Compose, config: TrainConfig, example: Tensor) -> Callable:
    """``loss(images, output, aux, labels) -> (loss, parts)``: the method's loss, or CE + KL to the original (a
    frozen copy of ``model``, which is left as it is)."""
    own = [(part, method_of(part).learned.loss) for part in policy.policies()
           if method_of(part).learned is not None and method_of(part).learned.loss is not None]
    if len(own) > 1:
        raise ValueError(f"{policy.describe()}: more than one method with its own training loss")
    if own:
        part, loss = own[0]
        return loss(model, part, config.distill_weight, (example,))
    weight = 0.5 if config.distill_weight is None else config.distill_weight
    teacher = frozen_copy(model)

    def distilled(images: Tensor, output: object, aux: dict, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = logits_of(output)
        with torch.no_grad():
            target = logits_of(teacher(images))
        kl = distillation(logits, target)
        ce = F.cross_entropy(logits, labels)
        return ce + weight * kl, {"cls": ce, "cls_kl": kl}

    return distilled


def _warm_value(step: int, target: float, config: TrainConfig) -> float:
    """The warm-up's value at ``step``: from 1 to ``target`` along a cosine over ``keep_warmup`` steps."""
    if step >= config.keep_warmup:
        return target
    return target + (1.0 - target) * (math.cos(math.pi * step / config.keep_warmup) + 1.0) / 2.0


def _keep_rate_at(step: int, target: float, config: TrainConfig) -> float:
    """The EViT warm-up's keep rate at ``step`` (:func:`_warm_value`), rounded up to one of ``keep_levels`` evenly
    spaced rates (the last is ``target``)."""
    if step >= config.keep_warmup:
        return target
    rate = _warm_value(step, target, config)
    levels = [target + (1.0 - target) * i / config.keep_levels for i in range(config.keep_levels + 1)]
    return min(level for level in levels if level >= rate - 1e-12)


def _warmup_graphs(base: nn.Module, policy: Policy | Compose, config: TrainConfig, example: Tensor,
                   criterion: Callable) -> dict:
    """keep rate → ``base`` transformed with its EViT/Top-K parts at that rate (or their own, if higher), sharing
    ``base``'s weights, for the rates the keep-rate warm-up of the lowest target visits; empty without one."""
    if not config.keep_warmup:
        return {}
    parts = policy.policies()
    targets = [p.keep_rate for p in parts if isinstance(p, EViT)]
    if not targets:
        if _warms_target(criterion):
            return {}
        raise ValueError("keep_warmup applies to EViT and Top-K policies and to losses with a target usage "
                         "(AdaViT)")
    graphs = {}
    for rate in dict.fromkeys(_keep_rate_at(step, min(targets), config) for step in range(config.keep_warmup)):
        warm = [dataclasses.replace(p, keep_rate=max(rate, p.keep_rate)) if isinstance(p, EViT) else p for p in parts]
        graphs[rate] = transform(base, warm[0] if len(warm) == 1 else Compose(warm), example_inputs=(example,))
    return graphs


def _warms_target(criterion: Callable) -> bool:
    """Whether ``criterion`` pulls towards a target usage that the warm-up moves (``target``, ``final_target``)."""
    return hasattr(criterion, "target") and hasattr(criterion, "final_target")


def _average_gradients(model: nn.Module, world: int) -> None:
    """Average the gradients over the processes (what DistributedDataParallel does, without its hooks)."""
    for parameter in model.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= world


@torch.no_grad()
def _accuracy(model: nn.Module, data: Dataset, rank: int, world: int, batch: int = 250) -> float:
    """Top-1 of ``model`` on ``data``, the images shared out over the processes."""
    model.eval()
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
    hits = seen = 0
    for images, labels in DataLoader(data, batch_size=batch, sampler=sampler):
        hits += (logits_of(model(images)).argmax(-1) == labels).sum().item()
        seen += len(labels)
    model.train()
    return mean_over_processes(hits, world) / max(1e-9, mean_over_processes(seen, world))


def train(
    model: nn.Module,
    policy: Policy | Compose,
    data: Dataset,
    config: TrainConfig = TrainConfig(),
    *,
    eval_data: Dataset | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` transformed by ``policy`` on ``data`` (``(image, label)`` pairs), distilling from
    ``model`` itself, which is not changed (see the module docstring). ``checkpoint``: a file written at every
    evaluation and at the end (rank 0), from which ``resume=True`` continues."""
    rank, world = process_group()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} does not split over {world} processes")
    local = config.batch_size // world
    torch.manual_seed(config.seed)
    example = torch.stack([data[i][0] for i in range(2)])
    base = copy.deepcopy(model).train()  # the weights every graph of the student shares; ``model`` stays as it is;
    # in training mode, so that a model whose code branches on it (attention dropout) trains with that code
    student = transform(base, policy, example_inputs=(example,)).train()
    criterion = _criterion(model, policy, config, example)
    warm = _warmup_graphs(base, policy, config, example, criterion)
    lowest = min((p.keep_rate for p in policy.policies() if isinstance(p, EViT)), default=1.0)
    warms_target = bool(config.keep_warmup) and _warms_target(criterion)
    groups, scale = _groups(student, policy, config)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    start, losses, evaluations = 0, [], []
    if resume and checkpoint is not None and Path(checkpoint).exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        student.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start, losses, evaluations = saved["step"], saved["losses"], saved["evaluations"]
        torch.set_rng_state(saved["rng"])
    if world > 1:
        for tensor in student.state_dict().values():
            dist.broadcast(tensor, src=0)
    batches = _batches(data, local, rank, world, config.seed, config.workers)
    for _ in range(start):  # the data order of the steps done before resuming
        next(batches)
    steps = tqdm(range(start, config.steps), desc="training", unit="step", disable=not progress or rank != 0)
    began = time.perf_counter()
    for step in steps:
        images, labels = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config) * group["lr_scale"]
        graph = warm.get(_keep_rate_at(step, lowest, config), student).train()
        if warms_target:
            criterion.target = _warm_value(step, criterion.final_target, config)
        with collect() as aux:
            output = graph(images)
        loss, _ = criterion(images, output, aux, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            _average_gradients(student, world)
        if step < config.freeze_backbone:  # no gradient, so AdamW leaves the backbone (and its moments) as they are
            for parameter in optimizer.param_groups[0]["params"]:
                parameter.grad = None
        if config.clip is not None:
            nn.utils.clip_grad_norm_(student.parameters(), config.clip)
        optimizer.step()
        losses.append(mean_over_processes(loss.item(), world))
        steps.set_postfix(loss=f"{losses[-1]:.3f}")
        last = step + 1 == config.steps
        if eval_data is not None and (last or (config.eval_every and (step + 1) % config.eval_every == 0)):
            evaluations.append((step + 1, _accuracy(student, eval_data, rank, world)))
        if checkpoint is not None and rank == 0 and (last or evaluations and evaluations[-1][0] == step + 1):
            torch.save({"model": student.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
                        "losses": losses, "evaluations": evaluations, "rng": torch.get_rng_state(),
                        "policy": policy.describe(), "backbone_lr_scale": scale}, checkpoint)
    return TrainResult(student.eval(), losses, evaluations, time.perf_counter() - began)
