"""Stride: keep every ``step``-th patch token — a content-blind baseline, and the smallest complete method.

In each chosen block, after the residual add, keep the prefix tokens and the patch tokens ``0, step, 2·step, …``
of the block's input order: ``P + ceil((N − P) / step)`` tokens, the same rows for every image, so it compiles
to one static graph. It is what a token-reduction method costs with no scoring at all, the floor that a
content-aware method has to beat. In a padded batch (after ATS) each image keeps every ``step``-th of its
own tokens, its remaining slots taking its padding.

This module is also the worked example of ``docs/DEVELOPING.md``: a policy dataclass, a graph function
declared with its role, a block rewrite that returns its stream node, and the registration.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx
from torch import Tensor

from ..analysis import Block, TokenProgram
from ..errors import PolicyError
from ..ops import gather_tokens, graph_op
from ..ops.selection import after_prefix, own_counts
from ..passes.common import Rewrite, Role, insert_call, reroute_stream
from ..policies import Policy, check_layers, is_int, option, parse_count, parse_layers
from .registry import register_method

__all__ = ["Stride", "strided_rows"]


@dataclasses.dataclass(frozen=True)
class Stride(Policy):
    """Keep the prefix tokens and every ``step``-th patch token in each chosen block (``step=1``: all)."""

    step: int = option(parse_count)
    layers: tuple[int, ...] = option(parse_layers)

    def __post_init__(self) -> None:
        if not is_int(self.step) or self.step < 1:
            raise PolicyError(f"Stride.step must be a positive int, got {self.step!r}")
        object.__setattr__(self, "layers", check_layers(self.layers, "Stride"))

    def tokens_out(self, tokens_in: int, prefix: int, layer: int) -> int:
        return prefix + math.ceil((tokens_in - prefix) / self.step)

    def describe(self) -> str:
        return f"{self.method} every {self.step}"


@graph_op(padding="size")
def strided_rows(scores_like: Tensor, step: int, num_prefix: int, size: Tensor | None = None) -> Tensor:
    """The rows Stride keeps of ``scores_like`` ``[B, N, …]``: the prefix rows, then rows ``P, P + step, …``:
    ``[B, P + ceil((N − P) / step)]``. With ``size`` ``[B, N, 1]`` (a padded batch: padding has size 0 and comes
    last) each image keeps every ``step``-th of its own tokens and its remaining slots take its padding rows."""
    batch, tokens = scores_like.shape[0], scores_like.shape[1]
    slots = torch.arange(math.ceil((tokens - num_prefix) / step), device=scores_like.device)
    rows = (slots * step).expand(batch, -1)
    if size is not None:
        own = own_counts(size, num_prefix).unsqueeze(1)
        kept = torch.div(own + step - 1, step, rounding_mode="floor")
        rows = torch.where(slots < kept, rows, own + slots - kept)
    return after_prefix(rows, num_prefix)


@register_method(
    "stride", Stride, identity=lambda layers: Stride(1, layers), example=lambda layers: Stride(2, layers)
)
def keep_every_step(gm: fx.GraphModule, program: TokenProgram, block: Block, policy: Stride) -> Rewrite:
    """Keep ``block``'s prefix tokens and every ``step``-th patch token after its residual add."""
    mid = block.mid
    rows = insert_call(gm, mid, strided_rows, (mid, policy.step, program.prefix_tokens), {}, block, "rows", Role.ROWS)
    return Rewrite(reroute_stream(gm, block, gather_tokens, (rows,), policy.method), rows)
