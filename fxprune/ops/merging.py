"""Token merging (ToMe): bipartite soft matching and size-weighted merging."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .ordering import stable_argsort
from .registry import POSITIONS, ROWS, follows, graph_op
from .scoring import with_attn_mask
from .selection import add_rows, gather_tokens


def tome_merged_tokens(tokens: int, prefix: int, r: int) -> int:
    """Edges ToMe merges in a block receiving ``tokens`` (``prefix`` protected): ``min(r, (N − P) // 2)``."""
    return max(0, min(r, (tokens - prefix) // 2))


def _output_order(unmerged: int, destinations: int, prefix: int) -> list[int]:
    """Positions in ``cat([unmerged A, B])`` that put the prefix tokens back first, in their original order
    (the identity for at most one prefix token, which is A's first row).

    Prefix token ``i`` sits at index ``i // 2`` of A (even ``i``) or of B (odd ``i``).
    """
    prefix_rows = [i // 2 if i % 2 == 0 else unmerged + i // 2 for i in range(prefix)]
    a_rest = range((prefix + 1) // 2, unmerged)
    b_rest = range(unmerged + prefix // 2, unmerged + destinations)
    return prefix_rows + list(a_rest) + list(b_rest)


def _edge_scores(metric: Tensor, prefix: int, real: Tensor | None = None) -> Tensor:
    """Cosine similarity ``[B, Na, Nb]`` of the A tokens (even positions) of ``metric`` ``[B, N, c]`` to its B
    tokens (odd positions); −inf where either is a prefix token or (``real`` ``[B, N]`` False) padding."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    protected_a, protected_b = (prefix + 1) // 2, prefix // 2
    if protected_a:
        scores[:, :protected_a] = -math.inf
    if protected_b:
        scores[:, :, :protected_b] = -math.inf
    if real is not None:
        scores = scores.masked_fill(~real[:, ::2, None] | ~real[:, None, 1::2], -math.inf)
    return scores


def bipartite_matching(metric: Tensor, r: int, prefix: int) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching of ``metric`` ``[B, N, c]`` (keys averaged over heads).

    Tokens alternate between set A (even positions) and set B (odd); each A token's edge goes to its
    most cosine-similar B token, and the ``r`` most similar edges merge. Prefix tokens (the first
    ``prefix``) neither merge nor receive merges. Returns, for A, the unmerged rows ascending ``[B, Na − r]``,
    the merged rows ``[B, r]`` and, for those, the B rows they merge into ``[B, r]``.
    """
    best, best_b = _edge_scores(metric, prefix).max(dim=-1)
    edges = stable_argsort(best, descending=True)
    merged = edges[:, :r]
    unmerged = edges[:, r:].sort(dim=-1).values
    return unmerged, merged, best_b.gather(1, merged)


def padded_merge_rows(metric: Tensor, r: int, prefix: int, real: Tensor, width: int) -> Tensor:
    """ToMe's matching of :func:`bipartite_matching` per image of a padded batch: the output row ``[B, N]`` of
    each token of ``metric`` ``[B, N, c]``, of ``width`` rows.

    Each image merges its own ``min(r, (n − P) // 2)`` best edges among its own ``n`` tokens (``real``
    ``[B, N]``, padding last) and lays them out as alone: prefix rows in their order, its unmerged A tokens,
    its B tokens, then padding; a merged A token goes to its B token's row, padding to the last row.
    """
    best, best_b = _edge_scores(metric, prefix, real).max(dim=-1)
    rank = stable_argsort(stable_argsort(best, descending=True))
    own = real.sum(dim=1, keepdim=True)
    merges = torch.clamp(torch.div(own - prefix, 2, rounding_mode="floor"), max=r)
    position = torch.arange(metric.shape[1], device=metric.device)
    patch = real & (position >= prefix)
    a_kept = patch[:, ::2] & (rank >= merges)
    a_rows = prefix + a_kept.cumsum(dim=1) - 1
    b_rows = prefix + a_kept.sum(dim=1, keepdim=True) + patch[:, 1::2].cumsum(dim=1) - 1
    a_rows = torch.where(a_kept, a_rows, b_rows.gather(1, best_b.clamp(max=b_rows.shape[1] - 1)))
    rows = torch.empty_like(patch, dtype=torch.long)
    rows[:, ::2], rows[:, 1::2] = a_rows, b_rows
    rows = torch.where(position < prefix, position, rows)
    return torch.where(real, rows, width - 1)


def merge_sum(x: Tensor, unmerged: Tensor, merged: Tensor, destination: Tensor, prefix: int) -> Tensor:
    """Sum the merged A rows of ``x`` ``[B, N, c]`` into their B rows: ``[B, N − r, c]``, prefix rows first."""
    kept_a = gather_tokens(x, 2 * unmerged)  # A row i is row 2i of x, B row j is row 2j + 1
    b = add_rows(x[:, 1::2], destination, gather_tokens(x, 2 * merged))
    merged_tokens = torch.cat([kept_a, b], dim=1)
    order = _output_order(unmerged.shape[1], b.shape[1], prefix)
    return merged_tokens if order == list(range(len(order))) else merged_tokens[:, order]


@graph_op(stream=True, sized=True, padding="padded")
def tome_merge(
    x: Tensor, size: Tensor | None, keys: Tensor, r: int, prefix: int, padded: bool = False
) -> tuple[Tensor, Tensor]:
    """ToMe in one block: merge ``r`` token pairs of ``x`` ``[B, N, C]``, matched by the attention's
    ``keys`` ``[B, H, N, d]`` averaged over heads.

    Merged tokens are size-weighted means; ``size`` ``[B, N, 1]`` (None: every token stands for one
    patch) is summed alongside. Returns the tokens ``[B, N − r, C]`` and their sizes ``[B, N − r, 1]``.
    ``padded``: the batch holds padding (size 0, after each image's own tokens) and each image merges its own
    tokens as alone (:func:`padded_merge_rows`), padded to the widest result.
    """
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    r = tome_merged_tokens(x.shape[1], prefix, r)
    if r == 0:
        return x, size
    if padded:
        with torch.no_grad():
            rows = padded_merge_rows(keys.mean(dim=1), r, prefix, size[..., 0] > 0, x.shape[1] - r)
        size_out = _sum_rows(size, rows, x.shape[1] - r)
        merged = _sum_rows(x * size, rows, x.shape[1] - r)
        return torch.where(size_out > 0, merged / size_out.clamp(min=torch.finfo(size.dtype).tiny), 0.0), size_out
    with torch.no_grad():
        unmerged, merged, destination = bipartite_matching(keys.mean(dim=1), r, prefix)
    size_out = merge_sum(size, unmerged, merged, destination, prefix)
    x_out = merge_sum(x * size, unmerged, merged, destination, prefix) / size_out
    return x_out, size_out


@follows(tome_merge, POSITIONS)
def tome_merge_positions(
    positions: Tensor, size: Tensor | None, keys: Tensor, r: int, prefix: int, padded: bool = False
) -> Tensor:
    """The positions ``[B, N − r, 1]`` of the tokens :func:`tome_merge` gives with the same arguments, from those
    of its input ``[B, N, 1]``: a token that merged nothing keeps its position; a merged token takes its
    destination's (the B token the others merged into, which stays in place); padding gets −1. Repeats the
    matching (a cheap part of the merge) rather than change the merge's results."""
    r = tome_merged_tokens(positions.shape[1], prefix, r)
    if r == 0:
        return positions
    real = torch.ones_like(positions) if size is None else (size > 0).to(positions.dtype)
    index = torch.arange(positions.shape[1], device=positions.device)[None, :, None]
    anchor = ((index % 2 == 1) | (index < prefix)).to(positions.dtype) * real  # B and prefix rows: never merged away
    with torch.no_grad():
        if padded:
            width = positions.shape[1] - r
            rows = padded_merge_rows(keys.mean(dim=1), r, prefix, real[..., 0] > 0, width)

            def merged(x: Tensor) -> Tensor:
                return _sum_rows(x, rows, width)
        else:
            unmerged, into, destination = bipartite_matching(keys.mean(dim=1), r, prefix)

            def merged(x: Tensor) -> Tensor:
                return merge_sum(x, unmerged, into, destination, prefix)
        anchored, own = merged(anchor) > 0, merged(positions * (real - anchor))
        return torch.where(anchored, merged(positions * anchor), torch.where(merged(real) > 0, own, -1))


@follows(tome_merge, ROWS)
def tome_merge_rows(
    x: Tensor, size: Tensor | None, keys: Tensor, r: int, prefix: int, padded: bool = False
) -> Tensor:
    """Where :func:`tome_merge` with the same arguments sends each row of ``x`` ``[B, N, C]``: a token that merged
    nothing to its own row, a merged one to its destination's, padding nowhere (−1): ``[B, N]``. Repeats the
    matching, as :func:`tome_merge_positions` does."""
    rows = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    r = tome_merged_tokens(x.shape[1], prefix, r)
    if r == 0:
        return rows
    with torch.no_grad():
        if not padded:
            return merged_rows(*bipartite_matching(keys.mean(dim=1), r, prefix), prefix, x.shape[1])
        real = size[..., 0] > 0
        return torch.where(real, padded_merge_rows(keys.mean(dim=1), r, prefix, real, x.shape[1] - r), -1)


def merged_rows(unmerged: Tensor, merged: Tensor, destination: Tensor, prefix: int, tokens: int) -> Tensor:
    """The output row ``[B, N]`` of each of ``tokens`` rows in :func:`merge_sum` with the same matching (the A rows
    ``unmerged`` ``[B, Na − r]`` kept, ``merged`` ``[B, r]`` summed into the B rows ``destination`` ``[B, r]``)."""
    batch, kept = unmerged.shape
    device = unmerged.device
    output_row = torch.arange(kept + tokens // 2, device=device)  # of each row of cat([kept A, B])
    if prefix > 1:
        order = torch.tensor(_output_order(kept, tokens // 2, prefix), device=device)
        output_row = torch.empty_like(order).scatter(0, order, output_row)
    a_rows = torch.empty(batch, (tokens + 1) // 2, dtype=torch.long, device=device)
    a_rows = a_rows.scatter(1, unmerged, output_row[:kept].expand(batch, -1))
    a_rows = a_rows.scatter(1, merged, output_row[kept + destination])
    rows = torch.empty(batch, tokens, dtype=torch.long, device=device)
    rows[:, ::2], rows[:, 1::2] = a_rows, output_row[kept:].expand(batch, -1)
    return rows


def _sum_rows(x: Tensor, rows: Tensor, width: int) -> Tensor:
    """The rows of ``x`` ``[B, N, c]`` summed into ``width`` output rows by ``rows`` ``[B, N]``: ``[B, width, c]``."""
    return add_rows(x.new_zeros(x.shape[0], width, x.shape[-1]), rows, x)


@graph_op()
def size_bias(size: Tensor, attn_mask: Tensor | None, like: Tensor, proportional: bool = True) -> Tensor:
    """ToMe's proportional attention: ``log(size)`` per key as an additive SDPA mask ``[B, 1, 1, N]`` (not
    ``proportional``: 0, and −inf for padding, size 0).

    Combined with an existing ``attn_mask`` (boolean: False → −inf; float: added); in ``like``'s dtype.
    """
    weights = size if proportional else (size > 0).to(size.dtype)
    bias = weights.log()[:, None, None, :, 0].to(like.dtype)
    return bias if attn_mask is None else with_attn_mask(bias, attn_mask)
