"""Clustered attention (ClusTR): attend with every query to a few cluster tokens of keys and values.

Keys are clustered per image by a few weighted Lloyd (k-means) iterations on the keys averaged over
the heads of a group, from a fixed initial partition: cells of the token grid. Each cluster's key and
value are the weighted means of its members' and ``log(cluster weight)`` is added to its logit, so a
cluster of identical keys attends exactly as its members would. Token weights come from the
attention's key mask (1 by default; ``exp`` of a float mask, so ToMe's ``log(size)`` gives weights
``size``; 0 where a boolean mask is False). Prefix tokens stay their own clusters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .selection import add_rows


def _grid_shape(clusters: int, side: int) -> tuple[int, int] | None:
    """The most square ``rows × cols = clusters`` with both at most ``side``, if any."""
    for rows in range(math.isqrt(clusters), 0, -1):
        if clusters % rows == 0 and clusters // rows <= side:
            return rows, clusters // rows
    return None


def grid_cells(tokens: int, clusters: int, device: torch.device | None = None) -> Tensor:
    """Initial cluster of each of ``tokens`` tokens in sequence order ``[tokens]`` (``clusters ≤ tokens``).

    When ``tokens`` is a square ``s × s`` grid (row-major) and ``clusters`` factors as ``rows × cols``
    with both at most ``s``, the grid is cut into ``rows × cols`` near-equal cells; otherwise the
    sequence is cut into ``clusters`` near-equal runs.
    """
    index = torch.arange(tokens, device=device)
    side = math.isqrt(tokens)
    shape = _grid_shape(clusters, side) if side * side == tokens else None
    if shape is None:
        return index * clusters // tokens
    rows, cols = shape
    return (index // side * rows // side) * cols + index % side * cols // side


def key_weights(attn_mask: Tensor | None, batch: int, keys: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Weight of each key ``[B, N]`` from a per-key attention mask (broadcastable to ``[B, 1, 1, N]``):
    1 without a mask, 0/1 for a boolean mask, ``exp(mask)`` for an additive one."""
    if attn_mask is None:
        return torch.ones(batch, keys, dtype=dtype, device=device)
    row = attn_mask.reshape(-1, keys)
    weights = row.to(dtype) if row.dtype == torch.bool else row.to(dtype).exp()
    return weights.expand(batch, keys)


def cluster_sums(rows: Tensor, assign: Tensor, clusters: int) -> Tensor:
    """Sum of the rows of ``rows`` ``[B, N, c]`` per cluster, by ``assign`` ``[B, N]``: ``[B, M, c]``."""
    return add_rows(rows.new_zeros(rows.shape[0], clusters, rows.shape[-1]), assign, rows)


def _inverse(sizes: Tensor) -> Tensor:
    """``1 / sizes``, and 0 for an empty cluster."""
    return torch.where(sizes > 0, sizes.reciprocal(), torch.zeros_like(sizes))


def kmeans(features: Tensor, weights: Tensor, init: Tensor, clusters: int, iterations: int) -> Tensor:
    """Weighted Lloyd iterations on ``features`` ``[B, N, c]`` from the partition ``init`` ``[N]``.

    Each iteration moves every centroid to the ``weights``-weighted (``[B, N]``) mean of its members (an
    empty cluster keeps its centroid) and assigns every row to its nearest centroid (Euclidean; the
    lowest cluster index on a tie). Returns the cluster of each row ``[B, N]`` (``init`` for 0 iterations).
    """
    assign = init.expand(features.shape[0], -1)
    centroids = features.new_zeros(features.shape[0], clusters, features.shape[-1])
    weighted = torch.cat([features, features.new_ones(features.shape[:-1] + (1,))], dim=-1) * weights.unsqueeze(-1)
    for _ in range(iterations):
        sums = cluster_sums(weighted, assign, clusters)
        sizes = sums[..., -1:]
        centroids = torch.where(sizes > 0, sums[..., :-1] * _inverse(sizes), centroids)
        distances = centroids.pow(2).sum(-1).unsqueeze(1) - 2 * features @ centroids.transpose(1, 2)
        assign = distances.argmin(dim=-1)
    return assign


def cluster_assignment(k: Tensor, clusters: int, num_prefix: int, iterations: int, weights: Tensor) -> Tensor:
    """The cluster ``[B, N − P]`` of each non-prefix key of ``k`` ``[B, H, N, d]``: :func:`kmeans` on the keys
    averaged over heads, weighted by ``weights`` ``[B, N]``, from :func:`grid_cells` (``clusters ≤ N − P``)."""
    features = k[:, :, num_prefix:].mean(dim=1).to(weights.dtype)
    init = grid_cells(k.shape[2] - num_prefix, clusters, k.device)
    return kmeans(features, weights[:, num_prefix:], init, clusters, iterations)


def _token_major(x: Tensor) -> Tensor:
    """``[B, H, N, d]`` → ``[B, N, H·d]`` (a view where the heads of a token are adjacent in memory)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], x.shape[1] * x.shape[3])


def _head_major(x: Tensor, heads: int) -> Tensor:
    """``[B, M, H·d]`` → ``[B, H, M, d]``."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def cluster_keys_values(
    k: Tensor, v: Tensor, clusters: int, num_prefix: int, iterations: int, attn_mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """ClusTR's keys and values: the prefix tokens' own, then ``M`` cluster means.

    Clusters the non-prefix keys of ``k`` ``[B, H, N, d]`` (:func:`kmeans` on the head-averaged keys
    from :func:`grid_cells`, ``M = min(clusters, N − P)``) and averages keys and values ``v``
    ``[B, H, N, dv]`` per cluster, weighted by :func:`key_weights` of ``attn_mask``. Returns keys
    ``[B, H, P + M, d]``, values ``[B, H, P + M, dv]`` and the additive logit bias ``log(weight)`` of each
    ``[B, 1, 1, P + M]`` (−inf for an empty cluster), in ``k``'s dtype.
    """
    batch, heads, tokens, _ = k.shape
    clusters = min(clusters, tokens - num_prefix)
    weights = key_weights(attn_mask, batch, tokens, torch.promote_types(k.dtype, torch.float32), k.device)
    with torch.no_grad():
        assign = cluster_assignment(k, clusters, num_prefix, iterations, weights)
        prefix = torch.arange(num_prefix, device=k.device).expand(batch, num_prefix)
        slots = torch.cat([prefix, assign + num_prefix], dim=1)  # each prefix token is its own cluster
    sizes = cluster_sums(weights.unsqueeze(-1), slots, num_prefix + clusters)
    inverse = _inverse(sizes).to(k.dtype)

    def means(x: Tensor) -> Tensor:
        rows = _token_major(x)
        if attn_mask is not None:
            rows = rows * weights.unsqueeze(-1).to(x.dtype)
        return _head_major(cluster_sums(rows, slots, num_prefix + clusters) * inverse, heads)

    return means(k), means(v), sizes[:, None, None, :, 0].log().to(k.dtype)


def clustered_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_clusters: tuple[int, ...],
    num_prefix: int,
    iterations: int,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """Attention of every query ``q`` ``[B, H, N, d]`` to clustered keys and values (:func:`cluster_keys_values`).

    The heads are split into ``len(num_clusters)`` equal consecutive groups; group ``g`` clusters its
    keys into ``num_clusters[g]`` clusters (one entry: every head shares one clustering). Each group
    runs one fused ``scaled_dot_product_attention`` over ``P + M_g`` keys. ``k``/``v`` may have fewer
    heads than ``q`` (grouped-query attention). ``attn_mask`` holds one value per key (broadcastable to
    ``[B, 1, 1, N]``). Returns ``[B, H, N, dv]``, as the SDPA call it replaces.
    """
    if k.shape[1] != q.shape[1]:
        repeats = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
    groups = len(num_clusters)
    outputs = []
    for qg, kg, vg, clusters in zip(q.chunk(groups, 1), k.chunk(groups, 1), v.chunk(groups, 1), num_clusters):
        keys, values, bias = cluster_keys_values(kg, vg, clusters, num_prefix, iterations, attn_mask)
        attended = F.scaled_dot_product_attention(qg, keys, values, attn_mask=bias, dropout_p=dropout_p, scale=scale)
        outputs.append(attended)
    return outputs[0] if groups == 1 else torch.cat(outputs, dim=1)


def padded_cluster_keys_values(
    k: Tensor, v: Tensor, num_clusters: tuple[int, ...], num_prefix: int, iterations: int,
    attn_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`cluster_keys_values` for each head group of ``k`` ``[B, H, N, d]`` and ``v`` (as in
    :func:`clustered_attention`), for an explicit ``softmax(q @ kᵀ + bias) @ v``: groups with fewer
    clusters are padded with empty (−inf-biased) ones. Returns keys ``[B, H, P + M, d]``, values
    ``[B, H, P + M, dv]`` and the bias ``[B, 1, 1, P + M]`` (one group) or ``[B, H, 1, P + M]``, with
    ``M = max(num_clusters)``."""
    groups = len(num_clusters)
    parts = [cluster_keys_values(kg, vg, m, num_prefix, iterations, attn_mask)
             for kg, vg, m in zip(k.chunk(groups, 1), v.chunk(groups, 1), num_clusters)]
    if groups == 1:
        return parts[0]
    width = max(keys.shape[2] for keys, _, _ in parts)
    heads = k.shape[1] // groups

    def padded(index: int, value: float) -> Tensor:
        return torch.cat([F.pad(p[index], (0, 0, 0, width - p[index].shape[2]), value=value) for p in parts], dim=1)

    bias = [F.pad(b, (0, width - b.shape[-1]), value=-math.inf).expand(-1, heads, -1, -1) for _, _, b in parts]
    return padded(0, 0.0), padded(1, 0.0), torch.cat(bias, dim=1)
