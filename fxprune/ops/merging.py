"""Token merging (ToMe): bipartite soft matching and size-weighted merging."""

from __future__ import annotations

import math

import torch
from torch import Tensor

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


def bipartite_matching(metric: Tensor, r: int, prefix: int) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's bipartite soft matching of ``metric`` ``[B, N, c]`` (keys averaged over heads).

    Tokens alternate between set A (even positions) and set B (odd); each A token's edge goes to its
    most cosine-similar B token, and the ``r`` most similar edges merge. Prefix tokens (the first
    ``prefix``) neither merge nor receive merges. Returns, for A, the unmerged rows ascending ``[B, Na − r]``,
    the merged rows ``[B, r]`` and, for those, the B rows they merge into ``[B, r]``.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    protected_a, protected_b = (prefix + 1) // 2, prefix // 2
    if protected_a:
        scores[:, :protected_a] = -math.inf
    if protected_b:
        scores[:, :, :protected_b] = -math.inf
    best, best_b = scores.max(dim=-1)
    edges = best.argsort(dim=-1, descending=True)
    merged = edges[:, :r]
    unmerged = edges[:, r:].sort(dim=-1).values
    return unmerged, merged, best_b.gather(1, merged)


def merge_sum(x: Tensor, unmerged: Tensor, merged: Tensor, destination: Tensor, prefix: int) -> Tensor:
    """Sum the merged A rows of ``x`` ``[B, N, c]`` into their B rows: ``[B, N − r, c]``, prefix rows first."""
    kept_a = gather_tokens(x, 2 * unmerged)  # A row i is row 2i of x, B row j is row 2j + 1
    b = add_rows(x[:, 1::2], destination, gather_tokens(x, 2 * merged))
    merged_tokens = torch.cat([kept_a, b], dim=1)
    order = _output_order(unmerged.shape[1], b.shape[1], prefix)
    return merged_tokens if order == list(range(len(order))) else merged_tokens[:, order]


def tome_merge(x: Tensor, size: Tensor | None, keys: Tensor, r: int, prefix: int) -> tuple[Tensor, Tensor]:
    """ToMe in one block: merge ``r`` token pairs of ``x`` ``[B, N, C]``, matched by the attention's
    ``keys`` ``[B, H, N, d]`` averaged over heads.

    Merged tokens are size-weighted means; ``size`` ``[B, N, 1]`` (None: every token stands for one
    patch) is summed alongside. Returns the tokens ``[B, N − r, C]`` and their sizes ``[B, N − r, 1]``.
    """
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    r = tome_merged_tokens(x.shape[1], prefix, r)
    if r == 0:
        return x, size
    with torch.no_grad():
        unmerged, merged, destination = bipartite_matching(keys.mean(dim=1), r, prefix)
    size_out = merge_sum(size, unmerged, merged, destination, prefix)
    x_out = merge_sum(x * size, unmerged, merged, destination, prefix) / size_out
    return x_out, size_out


def size_bias(size: Tensor, attn_mask: Tensor | None, like: Tensor) -> Tensor:
    """ToMe's proportional attention: ``log(size)`` per key as an additive SDPA mask ``[B, 1, 1, N]``.

    Combined with an existing ``attn_mask`` (boolean: False → −inf; float: added); in ``like``'s dtype.
    """
    bias = size.log()[:, None, None, :, 0].to(like.dtype)
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        return bias.masked_fill(~attn_mask, -math.inf)
    return bias + attn_mask
