"""Training losses for reduced models: a frozen teacher that also gives its final tokens, and DynamicViT's loss.

:class:`DynamicViTLoss` is the official ``DistillDiffPruningLoss_dynamic`` (``losses.py`` of
``raoyongming/DynamicViT``) with the settings its DeiT recipe uses (``mse_token=True``)::

    loss = clf · CE(logits, labels)
         + ratio / S · Σ_s mean_b (mean_j D_s[b, j] − ρ^s)²                 (each stage's keep ratio)
         + distill · KL(teacher ‖ student) on the logits (batch mean)
         + distill · MSE(student tokens, teacher tokens) over the tokens the last stage keeps

with ``clf = 1``, ``ratio = 2``, ``distill = 0.5``; the teacher is the original model, frozen.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .analysis import analyse, final_tokens
from .capture import trace
from .errors import UnsupportedModelError
from .methods.dynamicvit import KEEP_KEY, TOKENS_KEY, DynamicViT

__all__ = ["TokenTeacher", "DynamicViTLoss", "logits_of"]


def logits_of(output: object) -> Tensor:
    """The logits of a model's output: the tensor itself, or its ``logits`` (Hugging Face), or its first element."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


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
        decisions = [values[-1] for key, values in aux.items() if key.startswith(KEEP_KEY)]
        if len(decisions) != len(self.targets) or TOKENS_KEY not in aux:
            raise ValueError(
                f"DynamicViTLoss needs the {len(self.targets)} stages' decisions and the final tokens: run the model "
                "in training mode inside `with fxprune.collect() as aux:` and pass aux"
            )
        ratio = sum(((d[..., 0].mean(dim=1) - target) ** 2).mean() for d, target in zip(decisions, self.targets))
        teacher_output, teacher_tokens = self.teacher(images)
        kl = F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(logits_of(teacher_output), dim=-1),
                      reduction="batchmean", log_target=True)
        tokens, kept = aux[TOKENS_KEY][-1], decisions[-1][..., 0].detach() > 0.5
        token = ((tokens - teacher_tokens) ** 2)[kept].mean() if kept.sum() >= 0.1 else tokens.new_zeros(())
        parts = {"cls": F.cross_entropy(logits, labels), "ratio": ratio / len(self.targets), "cls_kl": kl,
                 "token_mse": token}
        loss = (self.clf_weight * parts["cls"] + self.ratio_weight * parts["ratio"]
                + self.distill_weight * (parts["cls_kl"] + parts["token_mse"]))
        return loss, parts
