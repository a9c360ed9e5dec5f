"""ToMe: merge similar tokens between a block's attention and its MLP.

The merge is sized (:func:`~fxprune.ops.tome_merge` takes and returns the sizes ``[B, N, 1]``), so it starts
the sizes channel: token-state threading carries the sizes through every later block and, with
``prop_attn``, adds ``log(size)`` of the keys to every later attention (ToMe's proportional attention).
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from ..analysis import Block, TokenProgram
from ..ops import tome_merge, tome_merged_tokens
from ..passes.common import Rewrite, reroute_stream
from ..policies import (
    Policy,
    at_layer,
    check_flag,
    check_layers,
    check_per_layer,
    int_per_layer,
    option,
    parse_counts,
    parse_flag,
    parse_layers,
    per_layer_text,
)
from .registry import Knob, SweepContext, register_method

__all__ = ["ToMe"]


@dataclasses.dataclass(frozen=True)
class ToMe(Policy):
    """ToMe (Bolya et al., ICLR 2023): merge the ``r`` most similar token pairs in each chosen block.

    Between attention and MLP, bipartite soft matching on the keys averaged over heads merges
    ``min(r, (N − P) // 2)`` pairs into size-weighted means; sizes are carried to later blocks and,
    with ``prop_attn``, ``log(size)`` is added to every later attention's logits. ``r`` is one int for
    every chosen block or one per block; ``layers=None`` means every block.
    """

    r: int | tuple[int, ...] = option(parse_counts)
    layers: tuple[int, ...] | None = option(parse_layers, default=None)
    prop_attn: bool = option(parse_flag, default=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "r", int_per_layer(self.r, "ToMe.r", 0, "a non-negative int"))
        if self.layers is not None:
            object.__setattr__(self, "layers", check_layers(self.layers, "ToMe"))
            check_per_layer(self.r, len(self.layers), "ToMe.r")
        check_flag(self.prop_attn, "ToMe.prop_attn")

    def bind(self, depth: int, patches: int | None = None) -> ToMe:
        if self.layers is not None:
            return self
        check_per_layer(self.r, depth, "ToMe.r", "the model's {} blocks")
        return ToMe(self.r, tuple(range(depth)), self.prop_attn)

    def r_at(self, layer: int) -> int:
        """Pairs to merge in block ``layer``."""
        return at_layer(self.r, self.layers, layer)

    def tokens_out(self, tokens_in: int, prefix: int, layer: int) -> int:
        return tokens_in - tome_merged_tokens(tokens_in, prefix, self.r_at(layer))

    def describe(self) -> str:
        return f"{self.method} r {per_layer_text(self.r)}" + ("" if self.prop_attn else " (no prop. attn)")


def _largest_r_first(ctx: SweepContext) -> list[int]:
    return list(range((ctx.tokens - ctx.prefix_tokens) // 2, -1, -1))


@register_method(
    "tome", ToMe, needs_keys=True, carries_sizes=True, proportional=lambda policy: policy.prop_attn,
    merges_rows=lambda policy: True,
    knob=Knob(lambda ctx, r: ToMe(r), _largest_r_first),
    identity=lambda layers: ToMe(0, layers), example=lambda layers: ToMe(3, layers),
)
def merge_tokens(gm: fx.GraphModule, program: TokenProgram, block: Block, policy: ToMe) -> Rewrite:
    """Merge ``r`` token pairs of ``block`` after its residual add."""
    args = (block.attention.k, policy.r_at(block.index), program.prefix_tokens)
    return Rewrite(reroute_stream(gm, block, tome_merge, args, policy.method))
