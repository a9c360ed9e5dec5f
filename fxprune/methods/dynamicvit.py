"""DynamicViT: a learned predictor before each pruning block decides which patch tokens the block keeps.

As the official code (``raoyongming/DynamicViT``, ``models/dyvit.py``): stage ``s`` (the ``s``-th block of
``layers``) runs a ``PredictorLG`` on the patch tokens entering its block, with the keep decisions so far.

* Evaluation graph: the block keeps the ``int(N₀ · ρˢ)`` patch tokens with the largest keep score (``N₀`` the
  model's patch tokens at its input, ``ρ`` the keep rate), the same count for every image; the rows are really
  removed, before the block, so its attention and MLP run on fewer tokens (fused SDPA kept).
* Training graph: no row is removed. Hard Gumbel-softmax decisions, times the previous stage's, become the
  ``"keep"`` token-state channel, and every attention from the first stage on renormalises over the kept keys
  (``softmax_with_policy``). Each stage's decisions ``[B, N₀, 1]`` and the final patch tokens are emitted
  (:data:`KEEP_KEY`, :data:`TOKENS_KEY`) for :class:`fxprune.losses.DynamicViTLoss` (``fxprune.collect``).

The predictors are submodules ``fxprune.<block>.predictor`` shared by both graphs; ``weights`` names a file of
trained ones (``fxprune.save_weights``), or an official DynamicViT checkpoint (its ``score_predictor.*``).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..analysis import Block, TokenProgram, final_tokens
from ..errors import PolicyError, UnsupportedModelError
from ..ops import KEEP, gather_tokens, gumbel_keep, keep_rows, with_prefix
from ..ops.emitting import emit
from ..passes.common import Rewrite, Role, insert_call, reroute_stream
from ..passes.learned import insert_module
from ..passes.state import read_state, write_state
from ..policies import Policy, check_keep_rate, check_layers, option, parse_layers, parse_number, parse_text
from ..tools.weights import SHIPPED, shipped
from .registry import Learned, register_method

__all__ = ["DynamicViT", "PredictorLG", "KEEP_KEY", "TOKENS_KEY"]

KEEP_KEY = "dynamicvit/keep/"  # + block name: a stage's training decisions [B, N₀, 1], emitted in stage order
TOKENS_KEY = "dynamicvit/tokens"  # the final patch tokens [B, N₀, C] of the training graph


@dataclasses.dataclass(frozen=True)
class DynamicViT(Policy):
    """DynamicViT (Rao et al., NeurIPS 2021): learned token pruning at the blocks ``layers`` (the stages).

    Stage ``s`` keeps ``int(N₀ · keep_rate^s)`` of the model's ``N₀`` patch tokens (prefix tokens always stay; in
    a padded batch, after ATS, an image with fewer tokens keeps them all).
    ``weights``: a file of trained predictors (``fxprune.save_weights``; with a fine-tuned backbone too), an official
    DynamicViT checkpoint, or ``"digits"`` (the states shipped for the digits ViT); None: untrained, which the
    plan says.
    """

    keep_rate: float = option(parse_number, "keep")
    layers: tuple[int, ...] = option(parse_layers)
    weights: str | None = option(parse_text, default=None)
    patches: int | None = dataclasses.field(default=None, repr=False)  # N₀, set by bind

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_rate", check_keep_rate(self.keep_rate, "DynamicViT"))
        object.__setattr__(self, "layers", check_layers(self.layers, "DynamicViT"))

    def bind(self, depth: int, patches: int | None = None) -> DynamicViT:
        return self if patches is None else dataclasses.replace(self, patches=patches)

    def kept(self, layer: int) -> int:
        """Patch tokens kept at block ``layer``: ``int(N₀ · keep_rate^s)`` for its stage ``s``."""
        if self.patches is None:
            raise PolicyError("DynamicViT: the kept counts follow from the model's tokens; plan it for a model")
        return int(self.patches * self.keep_rate ** (self.layers.index(layer) + 1))

    def tokens_out(self, tokens_in: int, prefix: int, layer: int) -> int:
        return prefix + min(self.kept(layer), tokens_in - prefix)

    def describe(self) -> str:
        return f"{self.method} keep {self.keep_rate:g}" + ("" if self.weights else " (untrained)")

    def plan_notes(self) -> list[str]:
        if self.weights:
            return []
        return [f"{self.method}: the predictors are untrained (random): train the model, or pass weights="]


class PredictorLG(nn.Module):
    """DynamicViT's keep predictor on the patch tokens ``[B, N, C]``: ``LayerNorm → Linear(C, C) → GELU``, the
    second half of the channels averaged over the kept tokens (``policy`` ``[B, N, 1]``; None: all) into a
    global feature beside the first half, then ``Linear(C, C/2) → GELU → Linear(C/2, C/4) → GELU → Linear(C/4,
    2) → LogSoftmax``: log-probabilities ``[B, N, 2]``, channel 0 = keep. Linear weights truncated-normal (std
    0.02), biases 0, as the official code initialises them."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(), nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, policy: Tensor | None = None) -> Tensor:
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local, rest = x[..., :half], x[..., half:]
        if policy is None:
            policy = torch.ones_like(x[..., :1])
        pooled = (rest * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        return self.out_conv(torch.cat([local, pooled.expand_as(rest)], dim=-1))


def _patch_tokens(
    gm: fx.GraphModule, block: Block, x: fx.Node, prefix: int, name: str, after: fx.Node | None = None
) -> fx.Node:
    """A node of the patch rows ``x[:, P:]`` of ``x`` (inserted after ``x`` unless ``after`` is given)."""
    rows = (x, (slice(None), slice(prefix, None)))
    return insert_call(gm, x if after is None else after, operator.getitem, rows, {}, block, name)


def prune_tokens(gm: fx.GraphModule, program: TokenProgram, block: Block, policy: DynamicViT) -> Rewrite:
    """Evaluation: keep the prefix rows and the ``kept`` patch tokens of largest keep score, before ``block``."""
    prefix = program.prefix_tokens
    patches = _patch_tokens(gm, block, block.input, prefix, "patches")
    scores = insert_module(gm, patches, block, "predictor", (patches,))
    rows = insert_call(gm, scores, keep_rows, (scores, policy.kept(block.index), prefix), {}, block, "rows",
                       Role.ROWS)
    return Rewrite(reroute_stream(gm, block, gather_tokens, (rows,), policy.method, at=block.input), rows)


def mask_tokens(gm: fx.GraphModule, program: TokenProgram, block: Block, policy: DynamicViT) -> Rewrite:
    """Training: Gumbel decisions times the previous stage's become the keep policy from ``block`` on."""
    prefix = program.prefix_tokens
    previous = read_state(gm, block, KEEP)
    earlier = _patch_tokens(gm, block, previous, prefix, "kept_before")
    patches = _patch_tokens(gm, block, block.input, prefix, "patches", after=earlier)
    scores = insert_module(gm, patches, block, "predictor", (patches, earlier))
    decisions = insert_call(gm, scores, gumbel_keep, (scores, earlier), {}, block, "decisions")
    with gm.graph.inserting_after(decisions):
        gm.graph.call_function(emit, (decisions, f"{KEEP_KEY}{block.name}"))
    keep = insert_call(gm, decisions.next, with_prefix, (decisions, prefix), {}, block, "keep")
    write_state(gm, block, KEEP, keep)
    if block.index == policy.layers[-1]:
        _emit_final_tokens(gm, program, block)
    return Rewrite()


def _emit_final_tokens(gm: fx.GraphModule, program: TokenProgram, block: Block) -> None:
    """Emit the model's final patch tokens (after its last block and final norm) as :data:`TOKENS_KEY`."""
    tokens = final_tokens(program)
    if tokens is None:
        raise UnsupportedModelError(
            f"DynamicViT's token distillation needs the model's final tokens, but {program.model_name} has no "
            "[B, N, C] token stream after its last block"
        )
    patches = _patch_tokens(gm, block, tokens, program.prefix_tokens, "final_patches")
    with gm.graph.inserting_after(patches):
        gm.graph.call_function(emit, (patches, TOKENS_KEY))


def _predictors(policy: DynamicViT, block: Block, program: TokenProgram) -> dict[str, Any]:
    return {"predictor": PredictorLG(program.dim)}


def official_predictors(saved: dict, names: list[str]) -> dict[str, Tensor] | None:
    """The predictors of an official DynamicViT checkpoint (``{"model": state}`` or the state itself, whose
    ``score_predictor.<stage>.*`` keys hold one ``PredictorLG`` per stage) under ``names`` (one per stage, in
    order); None when it has none. Its backbone keys are timm's: load them into the model itself."""
    state = saved.get("model", saved)
    prefix = "score_predictor."
    found = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if not found:
        return None
    translated = {}
    for key, value in found.items():
        stage, _, rest = key.partition(".")
        name = names[int(stage)] if int(stage) < len(names) else f"stage_{stage}"  # a stage this policy lacks
        translated[f"{name}.{rest}"] = value
    return translated


SHIPPED_LAYERS = (1, 3, 4)
SHIPPED_KEEP_RATES = (0.7, 0.5)


def weights_file(policy: DynamicViT) -> str | None:
    """The file ``policy.weights`` names: a path, or, for ``"digits"``, the shipped state for its keep rate (the
    digits ViT's backbone fine-tuned with predictors at blocks 1, 3, 4)."""
    if policy.weights != SHIPPED:
        return policy.weights
    offered = policy.layers == SHIPPED_LAYERS and policy.keep_rate in SHIPPED_KEEP_RATES
    name = f"dynamicvit_digits_keep{round(100 * policy.keep_rate)}.pt" if offered else None
    return shipped(name, f"{policy.describe()} at {policy.layers}",
                   f"keep rates {', '.join(map(str, SHIPPED_KEEP_RATES))} at layers {SHIPPED_LAYERS} of the digits ViT")


def _loss(teacher: nn.Module, policy: DynamicViT, distill_weight: float | None, example_inputs) -> nn.Module:
    from ..losses import DynamicViTLoss

    weight = 0.5 if distill_weight is None else distill_weight
    return DynamicViTLoss(teacher, policy, distill_weight=weight, example_inputs=example_inputs)


register_method(
    "dynamicvit", DynamicViT,
    learned=Learned(_predictors, mask_tokens, weights=weights_file, translate=official_predictors, loss=_loss),
    identity=lambda layers: DynamicViT(1.0, layers), example=lambda layers: DynamicViT(0.6, layers),
)(prune_tokens)
