"""Token rows: gathering and summing rows per image, and selection by score (EViT, Top-K).

Row gathers and sums run on the flattened ``[B·N, …]`` rows (``index_select``/``index_add``): on CPU
they are several times faster than ``gather``/``scatter`` with an index expanded over the channels
(at batch 32, 0.2 ms instead of 3.8 ms for DeiT-S's tokens) and give the same values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .ordering import stable_argsort
from .registry import KEEP, POSITIONS, ROWS, SIZES, follows, graph_op


def evit_kept_tokens(candidates: int, keep_rate: float) -> int:
    """Tokens EViT keeps out of ``candidates`` non-prefix tokens: ``ceil(keep_rate · candidates)``."""
    return min(candidates, math.ceil(keep_rate * candidates))


def _flat_index(index: Tensor, rows: int) -> Tensor:
    """Positions ``[B·K]`` in ``B·rows`` flattened rows of the per-image rows ``index`` ``[B, K]``."""
    return (index + rows * torch.arange(index.shape[0], device=index.device).unsqueeze(1)).reshape(-1)


@graph_op()
def initial_state(tokens: Tensor, channel: str) -> Tensor:
    """Token state ``[B, N, 1]`` of the rows of ``tokens`` ``[B, N, C]`` as they enter the model's first block:
    ``"sizes"`` 1 (each row one patch), ``"positions"`` 0…N−1 (int64), ``"keep"`` 1 (every row kept). A rewrite
    reads a channel through this call; token-state threading replaces it by the threaded state where an earlier
    block changed the rows or the channel."""
    batch, rows = tokens.shape[0], tokens.shape[1]
    if channel == POSITIONS:
        return torch.arange(rows, device=tokens.device).view(1, rows, 1).expand(batch, rows, 1)
    if channel in (SIZES, KEEP):
        return tokens.new_ones(batch, rows, 1)
    raise ValueError(f"unknown token-state channel {channel!r}")


@graph_op(stream=True, carries=(SIZES, POSITIONS))
def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` ``[B, K]`` of ``tokens`` ``[B, N, …]``: ``[B, K, …]``."""
    batch, rows, rest = tokens.shape[0], tokens.shape[1], tokens.shape[2:]
    flat = tokens.reshape(batch * rows, *rest).index_select(0, _flat_index(index, rows))
    return flat.view(batch, index.shape[1], *rest)


@follows(gather_tokens, ROWS)
def gather_tokens_rows(tokens: Tensor, index: Tensor) -> Tensor:
    """Where :func:`gather_tokens` sends each row of ``tokens`` ``[B, N, …]``: its first slot in ``index``
    ``[B, K]``, −1 for a row not gathered: ``[B, N]``."""
    return index_slots(index, tokens.shape[1])


def index_slots(index: Tensor, rows: int) -> Tensor:
    """The first slot of each of ``rows`` rows in ``index`` ``[B, K]``, −1 for a row it does not hold: ``[B, rows]``."""
    batch, slots = index.shape
    slot = torch.arange(slots, device=index.device).expand(batch, slots)
    first = index.new_full((batch, rows), slots).scatter_reduce(1, index, slot, "amin")
    return torch.where(first < slots, first, -1)


def add_rows(target: Tensor, index: Tensor, source: Tensor) -> Tensor:
    """``target`` ``[B, M, c]`` with each row of ``source`` ``[B, K, c]`` added to its row ``index`` ``[B, K]``."""
    batch, rows, width = target.shape
    flat_source = source.reshape(-1, width).contiguous()  # index_add is much slower on strided rows
    summed = target.reshape(batch * rows, width).index_add(0, _flat_index(index, rows), flat_source)
    return summed.reshape(batch, rows, width)


def after_prefix(rows: Tensor, num_prefix: int) -> Tensor:
    """Rows ``[B, K]`` counted among the non-prefix tokens as rows of the whole sequence, after its
    ``num_prefix`` prefix rows: ``[B, P + K]``."""
    prefix = torch.arange(num_prefix, device=rows.device).expand(rows.shape[0], num_prefix)
    return torch.cat([prefix, rows + num_prefix], dim=1)


def own_counts(size: Tensor, num_prefix: int) -> Tensor:
    """Each image's own non-prefix tokens ``[B]``: those of non-zero ``size`` ``[B, N, 1]`` (padding, size 0,
    always comes after them)."""
    return (size[:, num_prefix:, 0] > 0).sum(dim=1)


def _kept_counts(own: Tensor, keep_rate: float) -> Tensor:
    """:func:`evit_kept_tokens` of each image's own non-prefix tokens ``own`` ``[B]``: ``[B]``."""
    return torch.minimum(own, (own.to(torch.float64) * keep_rate).ceil().to(own.dtype))


@graph_op(padding="size")
def topk_rows(scores: Tensor, keep_rate: float, num_prefix: int, size: Tensor | None = None) -> Tensor:
    """Rows Top-K keeps of the tokens scored ``scores`` ``[B, N]``: the prefix rows, then the
    ``K = ceil(keep_rate · (N − P))`` other rows with the largest scores, largest first: ``[B, P + K]``.
    Every row, in order, when none is dropped.

    With ``size`` ``[B, N, 1]`` (a padded batch: padding has size 0 and comes last) each image keeps
    ``ceil(keep_rate · its own tokens)`` of its own tokens, and its remaining slots take its padding rows.
    """
    batch, tokens = scores.shape
    keep = evit_kept_tokens(tokens - num_prefix, keep_rate)
    if keep == tokens - num_prefix:
        return torch.arange(tokens, device=scores.device).expand(batch, tokens)
    candidates = scores[:, num_prefix:]
    if size is None:
        return after_prefix(stable_argsort(candidates, descending=True)[:, :keep], num_prefix)
    own = own_counts(size, num_prefix).unsqueeze(1)
    real = torch.arange(tokens - num_prefix, device=scores.device) < own
    top = stable_argsort(candidates.masked_fill(~real, float("-inf")), descending=True)[:, :keep]
    slot = torch.arange(keep, device=scores.device)
    kept = _kept_counts(own, keep_rate)
    return after_prefix(torch.where(slot < kept, top, own + slot - kept), num_prefix)


def _drops_tokens(tokens: int, keep_rate: float, num_prefix: int) -> bool:
    return evit_kept_tokens(tokens - num_prefix, keep_rate) < tokens - num_prefix


def _with_fused(
    kept: Tensor, fused: Tensor, size: Tensor | None, keep_rate: float, num_prefix: int, blank: float = 0.0
) -> Tensor:
    """``kept`` ``[B, P + K, c]`` followed by the fused token ``fused`` ``[B, 1, c]``: ``[B, P + K + 1, c]``. In a
    padded batch (``size`` given) each image's fused token goes right after its own kept tokens (its padding,
    whose last row is ``blank``, follows), where it is alone."""
    if size is None:
        return torch.cat([kept, fused], dim=1)
    out = torch.cat([kept, torch.full_like(fused, blank)], dim=1)
    at = num_prefix + _kept_counts(own_counts(size, num_prefix), keep_rate)
    here = (torch.arange(out.shape[1], device=out.device) == at.unsqueeze(1)).unsqueeze(-1)
    return torch.where(here, fused, out)


@graph_op(stream=True, padding="size")
def evit_select(
    x: Tensor, scores: Tensor, keep_rate: float, num_prefix: int, fuse: bool, size: Tensor | None = None
) -> Tensor:
    """EViT token selection: ``[B, N, C]`` → ``[B, P + K (+1), C]``.

    Keeps the rows :func:`topk_rows` gives for ``scores`` ``[B, N]`` (class attention), then, with ``fuse``,
    one token ``Σ_{j dropped} score_j · x_j`` (raw weights). Returns ``x`` itself when no token is dropped.
    With ``size`` ``[B, N, 1]`` (a padded batch) each image keeps and fuses its own tokens, as alone.
    """
    if not _drops_tokens(x.shape[1], keep_rate, num_prefix):
        return x
    rows = topk_rows(scores, keep_rate, num_prefix, size)
    kept = gather_tokens(x, rows)
    if not fuse:
        return kept
    dropped = scores.scatter(1, rows, 0.0).to(x.dtype)  # the prefix rows are among ``rows``: weight 0
    if size is not None:
        dropped = dropped * (size[..., 0] > 0).to(x.dtype)
    return _with_fused(kept, torch.bmm(dropped.unsqueeze(1), x), size, keep_rate, num_prefix)


@follows(evit_select, SIZES)
def evit_select_sizes(
    sizes: Tensor, scores: Tensor, keep_rate: float, num_prefix: int, fuse: bool, size: Tensor | None = None
) -> Tensor:
    """The sizes ``[B, N', 1]`` (patches each token stands for) of the tokens :func:`evit_select` gives with the
    same arguments, from the sizes ``[B, N, 1]`` of its input (``size``, as there: the sizes of a padded batch).

    Kept tokens keep their size; the fused token stands for every dropped token, so its size is theirs summed.
    """
    if not _drops_tokens(sizes.shape[1], keep_rate, num_prefix):
        return sizes
    kept = gather_tokens(sizes, topk_rows(scores, keep_rate, num_prefix, size))
    if not fuse:
        return kept
    fused = sizes.sum(1, keepdim=True) - kept.sum(1, keepdim=True)
    return _with_fused(kept, fused, size, keep_rate, num_prefix)


@follows(evit_select, ROWS)
def evit_select_rows(
    x: Tensor, scores: Tensor, keep_rate: float, num_prefix: int, fuse: bool, size: Tensor | None = None
) -> Tensor:
    """Where :func:`evit_select` with the same arguments sends each row of ``x`` ``[B, N, C]``: a kept token to
    its row, a dropped one nowhere (−1): ``[B, N]``. The fused token summarises the dropped tokens (Σ aⱼxⱼ over all
    of them) but stands for none of them, so a restored layout gives each dropped token its state when it was
    dropped (a better stand-in for a patch under a dense head, BENCHMARKS.md "Dense outputs")."""
    return index_slots(topk_rows(scores, keep_rate, num_prefix, size), x.shape[1])


@follows(evit_select, POSITIONS)
def evit_select_positions(
    positions: Tensor, scores: Tensor, keep_rate: float, num_prefix: int, fuse: bool, size: Tensor | None = None
) -> Tensor:
    """The positions ``[B, N', 1]`` of the tokens :func:`evit_select` gives with the same arguments, from those of
    its input ``[B, N, 1]``: a kept token keeps its position; the fused token takes the position of the dropped
    token with the largest weight in it (its highest-scoring one); padding, and a fused token of no token, −1."""
    if not _drops_tokens(positions.shape[1], keep_rate, num_prefix):
        return positions
    rows = topk_rows(scores, keep_rate, num_prefix, size)
    kept = gather_tokens(positions, rows)
    if not fuse:
        return kept
    dropped = scores.scatter(1, rows, -math.inf)
    if size is not None:
        dropped = dropped.masked_fill(size[..., 0] <= 0, -math.inf)
    weight, heaviest = dropped.max(dim=1, keepdim=True)
    fused = torch.where(weight > -math.inf, positions[..., 0].gather(1, heaviest), -1).unsqueeze(-1)
    return _with_fused(kept, fused.to(positions.dtype), size, keep_rate, num_prefix, blank=-1)
