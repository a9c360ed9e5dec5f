"""Random keep: keep a content-blind, seeded random subset of the patch tokens — the baseline a learned or
attention-based selection has to beat at the same token counts.

In each chosen block keep the prefix tokens and the ``ceil(keep_rate · (N − P))`` patch tokens with the largest
pseudo-random score, Top-K's counts. A row's score is a hash of ``(seed, block, row)``: the same rows for every
image and every run, so a batch gives each image what it gets alone, the graph is static and a model fine-tuned
with the policy sees the same pattern it is evaluated with. At an SDPA site only the kept queries attend, as
Top-K's; in a padded batch (after ATS) each image keeps its share of its own tokens.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch import Tensor

from ..analysis import Block, TokenProgram
from ..errors import PolicyError
from ..ops import evit_select, graph_op, topk_rows
from ..passes.common import Rewrite, Role, can_select_queries, insert_call, reroute_stream, select_queries
from ..policies import Policy, check_keep_rate, check_layers, is_int, option, parse_count, parse_layers, parse_number
from .evit import TopK
from .registry import register_method

__all__ = ["RandomKeep", "random_scores"]

_MASK = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class RandomKeep(Policy):
    """Keep ``ceil(keep_rate · (N − P))`` patch tokens chosen by a seeded hash of their row, in each chosen block."""

    keep_rate: float = option(parse_number, "keep")
    layers: tuple[int, ...] = option(parse_layers)
    seed: int = option(parse_count, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_rate", check_keep_rate(self.keep_rate, "RandomKeep"))
        object.__setattr__(self, "layers", check_layers(self.layers, "RandomKeep"))
        if not is_int(self.seed) or self.seed < 0:
            raise PolicyError(f"RandomKeep.seed must be a non-negative int, got {self.seed!r}")

    def tokens_out(self, tokens_in: int, prefix: int, layer: int) -> int:
        return TopK(self.keep_rate, self.layers).tokens_out(tokens_in, prefix, layer)

    def describe(self) -> str:
        return f"{self.method} keep {self.keep_rate:g} (seed {self.seed})"


def _mix(h):
    """One round of a 32-bit integer hash (xor-shift and multiply) of ``h`` below 2³², a Python int or an int64
    tensor."""
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & _MASK
    return h ^ (h >> 16)


@graph_op()
def random_scores(tokens: Tensor, seed: int, block: int) -> Tensor:
    """A pseudo-random score for each row of ``tokens`` ``[B, N, C]``: ``[B, N]`` float32, the same for every image,
    from a hash of ``(seed, block, row)``; no two rows tie (the row index fills the low bits), so every backend
    keeps the same rows."""
    tokens_in = tokens.shape[1]
    row_bits = max(int(tokens_in) - 1, 1).bit_length()  # int: a traced size (torch.jit.trace) is a tensor
    rows = torch.arange(tokens_in, device=tokens.device, dtype=torch.int64)
    key = _mix(_mix(seed & _MASK) ^ (block & _MASK))
    hashed = _mix(_mix(rows ^ key) ^ key) >> (32 - 24 + row_bits)
    scores = (hashed << row_bits) | rows
    return scores.to(torch.float32).expand(tokens.shape[0], -1)


@register_method(
    "random", RandomKeep,
    identity=lambda layers: RandomKeep(1.0, layers), example=lambda layers: RandomKeep(0.6, layers, seed=3),
)
def keep_at_random(gm: fx.GraphModule, program: TokenProgram, block: Block, policy: RandomKeep) -> Rewrite:
    """Keep ``block``'s prefix tokens and a seeded random share of its patch tokens (see the module docstring)."""
    if can_select_queries(block):
        before = block.attention.node.prev
        scores = insert_call(gm, before, random_scores, (block.input, policy.seed, block.index), {}, block,
                             "random_scores", Role.SCORE)
        rows = insert_call(gm, scores, topk_rows, (scores, policy.keep_rate, program.prefix_tokens), {}, block,
                           "random_rows", Role.ROWS)
        return Rewrite(select_queries(gm, block, rows), rows)
    scores = insert_call(gm, block.mid, random_scores, (block.mid, policy.seed, block.index), {}, block,
                         "random_scores", Role.SCORE)
    args = (scores, policy.keep_rate, program.prefix_tokens, False)
    return Rewrite(reroute_stream(gm, block, evit_select, args, policy.method))
