"""Training losses for reduced models: a frozen teacher that also gives its final tokens, DynamicViT's loss and
AdaViT's.

:class:`DynamicViTLoss` is the official ``DistillDiffPruningLoss_dynamic`` (``losses.py`` of
``raoyongming/DynamicViT``) with the settings its DeiT recipe uses (``mse_token=True``)::

    loss = clf · CE(logits, labels)
         + ratio / S · Σ_s mean_b (mean_j D_s[b, j] − ρ^s)²                 (each stage's keep ratio)
         + distill · KL(teacher ‖ student) on the logits (batch mean)
         + distill · MSE(student tokens, teacher tokens) over the tokens the last stage keeps

with ``clf = 1``, ``ratio = 2``, ``distill = 0.5``; the teacher is the original model, frozen.

:class:`AdaViTLoss` is the official ``AdaLoss`` (``models/losses.py`` of ``MengLcool/AdaViT``) with its released
settings::

    loss = CE(logits, labels) + 2 · |head usage − γ| + 2 · |sub-layer usage − γ| + 2 · (token usage − γ)²
         [+ distill · KL(teacher ‖ student) on the logits; the official default is 0, without a teacher]
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .analysis import analyse, final_tokens
from .capture import trace
from .errors import UnsupportedModelError
from .methods import adavit
from .methods.dynamicvit import KEEP_KEY, TOKENS_KEY, DynamicViT

__all__ = ["TokenTeacher", "DynamicViTLoss", "AdaViTLoss", "logits_of", "distillation", "frozen_copy"]


def logits_of(output: object) -> Tensor:
    """The logits of a model's output: the tensor itself, or its ``logits`` (Hugging Face), or its first element."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def distillation(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(teacher ‖ student) of the two models' class distributions ``[B, classes]``, averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                    reduction="batchmean", log_target=True)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in evaluation mode without gradients: a teacher that training leaves as it is."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def _last(aux: dict[str, list[Tensor]], prefix: str) -> list[Tensor]:
    """The last value emitted under each key of ``aux`` that starts with ``prefix``, in emission order."""
    return [values[-1] for key, values in aux.items() if key.startswith(prefix)]


class TokenTeacher(nn.Module):
    """A frozen copy of ``model`` whose forward returns ``(its output, its final patch tokens [B, N₀, C])`` (the
    token stream after its last block and final norm, prefix tokens left out), computed without gradients."""

    def __init__(self, model: nn.Module, example_inputs: Sequence[Tensor] | None = None):
        super().__init__()
        program = analyse(trace(model, example_inputs, copy_weights=True))
        tokens = final_tokens(program)
        if tokens is None:
            raise UnsupportedModelError(f"{program.model_name} has no [B, N, C] token stream after its last block")
        gm = program.gm
        output = gm.graph.output_node()
        rows = (slice(None), slice(program.prefix_tokens, None))
        with gm.graph.inserting_before(output):
            patches = gm.graph.call_function(operator.getitem, (tokens, rows))
        output.args = ((output.args[0], patches),)
        for node in gm.graph.nodes:
            node.meta.pop("val", None)
        gm.recompile()
        self.model = gm.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> TokenTeacher:
        return super().train(False)  # the teacher stays in evaluation mode

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[object, Tensor]:
        return self.model(images)


class DynamicViTLoss(nn.Module):
    """DynamicViT's training loss (see the module docstring) for a model transformed with ``policy``, distilled
    from ``teacher`` (the original model). Call it with the images, the student's output, the values the
    training graph emitted (``fxprune.collect``) and the labels; returns the loss and its parts."""

    def __init__(
        self, teacher: nn.Module, policy: DynamicViT, *, clf_weight: float = 1.0, ratio_weight: float = 2.0,
        distill_weight: float = 0.5, example_inputs: Sequence[Tensor] | None = None,
    ):
        super().__init__()
        self.teacher = teacher if isinstance(teacher, TokenTeacher) else TokenTeacher(teacher, example_inputs)
        self.targets = [policy.keep_rate ** (stage + 1) for stage in range(len(policy.layers))]
        self.clf_weight, self.ratio_weight, self.distill_weight = clf_weight, ratio_weight, distill_weight

    def forward(
        self, images: Tensor, output: object, aux: dict[str, list[Tensor]], labels: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        logits = logits_of(output)
        decisions = _last(aux, KEEP_KEY)
        if len(decisions) != len(self.targets) or TOKENS_KEY not in aux:
            raise ValueError(
                f"DynamicViTLoss needs the {len(self.targets)} stages' decisions and the final tokens: run the model "
                "in training mode inside `with fxprune.collect() as aux:` and pass aux"
            )
        ratio = sum(((d[..., 0].mean(dim=1) - target) ** 2).mean() for d, target in zip(decisions, self.targets))
        teacher_output, teacher_tokens = self.teacher(images)
        kl = distillation(logits, logits_of(teacher_output))
        tokens, kept = aux[TOKENS_KEY][-1], decisions[-1][..., 0].detach() > 0.5
        token = ((tokens - teacher_tokens) ** 2)[kept].mean() if kept.sum() >= 0.1 else tokens.new_zeros(())
        parts = {"cls": F.cross_entropy(logits, labels), "ratio": ratio / len(self.targets), "cls_kl": kl,
                 "token_mse": token}
        loss = (self.clf_weight * parts["cls"] + self.ratio_weight * parts["ratio"]
                + self.distill_weight * (parts["cls_kl"] + parts["token_mse"]))
        return loss, parts


class AdaViTLoss(nn.Module):
    """AdaViT's training loss (see the module docstring) for a model transformed with ``policy`` (γ = its
    ``usage``). Head usage is the mean head decision over the images and the blocks that use at least one of their
    sub-layers (every block when sub-layers are not decided); sub-layer usage the mean over images, blocks and the
    two sub-layers; token usage the mean over images, blocks and rows (prefix rows included, always used). A kind
    the policy does not decide has no term. ``distill_weight > 0`` adds KL(teacher ‖ student)
    with the frozen ``teacher`` (the original model). Called as :class:`DynamicViTLoss`."""

    def __init__(
        self, teacher: nn.Module | None, policy: adavit.AdaViT, *, head_weight: float = 2.0,
        sublayer_weight: float = 2.0, token_weight: float = 2.0, distill_weight: float = 0.0,
    ):
        super().__init__()
        if distill_weight > 0 and teacher is None:
            raise ValueError("AdaViTLoss: distill_weight > 0 needs the teacher (the original model)")
        self.teacher = frozen_copy(teacher) if distill_weight > 0 else None
        self.target = self.final_target = policy.usage  # the trainer's keep_warmup moves target from 1 to usage
        self.decides = policy.decides
        self.head_weight, self.sublayer_weight, self.token_weight = head_weight, sublayer_weight, token_weight
        self.distill_weight = distill_weight

    def forward(
        self, images: Tensor, output: object, aux: dict[str, list[Tensor]], labels: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        logits = logits_of(output)
        keys = (adavit.HEADS_KEY, adavit.SUBLAYERS_KEY, adavit.TOKENS_KEY)
        heads, sublayers, rows = (_last(aux, key) if kind in self.decides else []
                                  for key, kind in zip(keys, adavit.DECIDED))
        if not (heads or sublayers or rows):
            raise ValueError("AdaViTLoss needs the blocks' decisions: run the model in training mode inside "
                             "`with fxprune.collect() as aux:` and pass aux")
        parts = {"cls": F.cross_entropy(logits, labels)}
        loss = parts["cls"]
        if rows:
            parts["tokens"] = (torch.stack([r.mean() for r in rows]).mean() - self.target) ** 2
            loss = loss + self.token_weight * parts["tokens"]
        if sublayers or heads:
            sublayer = torch.stack(_last(aux, adavit.SUBLAYERS_KEY), dim=1)  # [B, blocks, 2]; ones if not decided
        if sublayers:
            parts["sublayers"] = (sublayer.mean() - self.target).abs()
            loss = loss + self.sublayer_weight * parts["sublayers"]
        if heads:
            head = torch.stack(heads, dim=1)  # [B, blocks, H]
            in_use = (sublayer.detach().sum(-1, keepdim=True) > 0).to(head.dtype).expand_as(head)
            parts["heads"] = ((head * in_use).sum() / (in_use.sum() + 1e-6) - self.target).abs()
            loss = loss + self.head_weight * parts["heads"]
        if self.teacher is not None:
            with torch.no_grad():
                target = logits_of(self.teacher(images))
            parts["cls_kl"] = distillation(logits, target)
            loss = loss + self.distill_weight * parts["cls_kl"]
        return loss, parts
