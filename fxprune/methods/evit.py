"""EViT and Top-K: keep the tokens the class token attends to most (in a model without a class token: the tokens
that receive the most attention), between a block's attention and its MLP.

EViT needs every row after the residual add (its fused token sums the dropped ones), so it selects there,
scoring beside the kept SDPA call. Top-K drops the other rows outright: at an SDPA site it scores before the
attention and only the kept queries attend (:func:`~fxprune.passes.common.select_queries`), which gives the
same outputs for fewer MACs; at an explicit ``softmax(q @ kᵀ) @ v`` it selects after the add, like EViT.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from ..analysis import Block, TokenProgram
from ..ops import evit_kept_tokens, evit_select, topk_rows
from ..passes.common import Rewrite, Role, can_select_queries, insert_call, reroute_stream, select_queries, token_scores
from ..policies import (
    Policy,
    check_flag,
    check_keep_rate,
    check_layers,
    option,
    parse_flag,
    parse_layers,
    parse_number,
)
from .registry import Knob, SweepContext, register_method

__all__ = ["EViT", "TopK"]

KEEP_RATES = [k / 100 for k in range(1, 101)]  # the keep rates ``fxprune bench`` fits, in order of growing MACs


@dataclasses.dataclass(frozen=True)
class EViT(Policy):
    """EViT (Liang et al., ICLR 2022): keep the tokens the class token attends to most, fuse the rest.

    In each chosen block, between attention and MLP, keep ``ceil(keep_rate · (N − P))`` non-prefix
    tokens with the largest head-averaged class attention (without a class token: attention received, averaged
    over queries and heads); with ``fuse`` append one token, the attention-weighted sum of the dropped ones.
    """

    keep_rate: float = option(parse_number, "keep")
    layers: tuple[int, ...] = option(parse_layers)
    fuse: bool = option(parse_flag, default=True)

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "keep_rate", check_keep_rate(self.keep_rate, name))
        object.__setattr__(self, "layers", check_layers(self.layers, name))
        check_flag(self.fuse, f"{name}.fuse")

    def tokens_out(self, tokens_in: int, prefix: int, layer: int) -> int:
        candidates = tokens_in - prefix
        keep = evit_kept_tokens(candidates, self.keep_rate)
        return prefix + keep + (1 if self.fuse and keep < candidates else 0)

    def describe(self) -> str:
        return f"{self.method} keep {self.keep_rate:g}" + (" + fused token" if self.fuse else "")


@dataclasses.dataclass(frozen=True)
class TopK(EViT):
    """Top-K: EViT's class-attention selection without the fused token."""

    fuse: bool = dataclasses.field(default=False, init=False)


def select_by_class_attention(gm: fx.GraphModule, program: TokenProgram, block: Block, policy: EViT) -> Rewrite:
    """Select the top tokens of ``block`` by class attention (see the module docstring)."""
    if not policy.fuse and can_select_queries(block):
        scores = token_scores(gm, block, program.class_token, before=True)
        args = (scores, policy.keep_rate, program.prefix_tokens)
        rows = insert_call(gm, scores, topk_rows, args, {}, block, "topk_rows", Role.ROWS)
        return Rewrite(select_queries(gm, block, rows), rows)
    scores = token_scores(gm, block, program.class_token)
    args = (scores, policy.keep_rate, program.prefix_tokens, policy.fuse)
    return Rewrite(reroute_stream(gm, block, evit_select, args, policy.method))


def _keep_rates(ctx: SweepContext) -> list[float]:
    return KEEP_RATES


register_method(
    "evit", EViT, scores_tokens=True, merges_rows=lambda policy: policy.fuse,
    knob=Knob(lambda ctx, keep: EViT(keep, ctx.layers), _keep_rates, at_layers=True),
    identity=lambda layers: EViT(1.0, layers), example=lambda layers: EViT(0.6, layers),
)(select_by_class_attention)
register_method(
    "topk", TopK, scores_tokens=True,
    knob=Knob(lambda ctx, keep: TopK(keep, ctx.layers), _keep_rates, at_layers=True),
    identity=lambda layers: TopK(1.0, layers), example=lambda layers: TopK(0.6, layers),
)(select_by_class_attention)
