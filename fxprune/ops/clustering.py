"""Clustered attention (ClusTR): attend with every query to a few cluster tokens of keys and values.

Keys are clustered per image on the keys averaged over the heads of a group: by DPC-KNN, the density
peaks clustering of the official ClusTR code (one pass, no iterations), or by k-means from
farthest-point seeds; either can be refined by weighted Lloyd iterations. Every step is
deterministic (ties go to the lower token or cluster index). Each cluster's key and value are the
weighted means of its members' and ``log(cluster weight)`` is added to its logit, so a cluster of
identical keys attends exactly as its members would. Token weights come from the attention's key
mask (1 by default; ``exp`` of a float mask, so ToMe's ``log(size)`` gives weights ``size``; 0 where a
boolean mask is False). A mask that differs per query or head (a relative position bias) gives each
query its own logit bias to a cluster, ``log Σ_{j ∈ c} exp(mask_ij)``: the members' total weight under
that query's bias, so a cluster of identical keys and values still attends exactly as its members
would; the keys' weights then come from a separate per-key mask (sizes, padding). Tokens of weight 0
are padding (ATS pads each image to the batch's longest): they enter no per-image statistic and are
never chosen as a centre before a real token, so a padded image is clustered as it is alone. Prefix
tokens stay their own clusters. Pairwise and centre distances are matrix products, so
:func:`fxprune.flops` counts the clustering."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .ordering import stable_argsort
from .registry import graph_op
from .scoring import mask_4d, match_heads
from .selection import add_rows

NEIGHBOURS = 5  # DPC-KNN's k: a token's density is read from its 5 nearest tokens, itself included (official)


def key_weights(attn_mask: Tensor | None, batch: int, keys: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Weight of each key ``[B, N]`` from a per-key attention mask (broadcastable to ``[B, 1, 1, N]``):
    1 without a mask, 0/1 for a boolean mask, ``exp(mask)`` for an additive one."""
    if attn_mask is None:
        return torch.ones(batch, keys, dtype=dtype, device=device)
    row = attn_mask.reshape(-1, keys)
    weights = row.to(dtype) if row.dtype == torch.bool else row.to(dtype).exp()
    return weights.expand(batch, keys)


def holds_one_value_per_key(attn_mask: Tensor | None) -> bool:
    """Whether ``attn_mask`` (broadcastable to ``[B, H, N, N]``) is the same for every query and head."""
    return attn_mask is None or all(size == 1 for size in attn_mask.shape[-3:-1])


def cluster_logit_bias(attn_mask: Tensor, slots: Tensor, clusters: int) -> Tensor:
    """Each query's additive bias to each cluster, ``log Σ_{j ∈ c} exp(attn_mask_ij)`` over the cluster's members
    ``j`` (boolean masks: 0 / −inf; −inf for a cluster with no member the query may attend to): ``attn_mask``
    ``[B | 1, H', N, N]`` (``H'`` 1 or the heads), ``slots`` ``[B, N]`` each key's cluster → ``[B, H', N,
    clusters]``, in float32 at least."""
    dtype = torch.promote_types(attn_mask.dtype, torch.float32) if attn_mask.is_floating_point() else torch.float32
    mask = torch.zeros((), dtype=dtype, device=attn_mask.device).masked_fill(~attn_mask, -math.inf) if (
        attn_mask.dtype == torch.bool) else attn_mask.to(dtype)
    mask = mask.expand(slots.shape[0], *mask.shape[1:])
    top = mask.amax(-1, keepdim=True)
    top = torch.where(top.isfinite(), top, torch.zeros_like(top))
    index = slots[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1)
    sums = mask.new_zeros(*mask.shape[:-1], clusters).scatter_add_(-1, index, (mask - top).exp())
    return sums.log() + top


def cluster_sums(rows: Tensor, assign: Tensor, clusters: int) -> Tensor:
    """Sum of the rows of ``rows`` ``[B, N, c]`` per cluster, by ``assign`` ``[B, N]``: ``[B, M, c]``."""
    return add_rows(rows.new_zeros(rows.shape[0], clusters, rows.shape[-1]), assign, rows)


def _inverse(sizes: Tensor) -> Tensor:
    """``1 / sizes``, and 0 for an empty cluster."""
    return torch.where(sizes > 0, sizes.reciprocal(), torch.zeros_like(sizes))


def squared_distances(x: Tensor, y: Tensor, padding: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances ``[B, N, M]`` between the rows of ``x`` ``[B, N, c]`` and ``y`` ``[B, M, c]``,
    as ``‖x‖² + ‖y‖² − 2 x yᵀ`` (one matrix product), clamped at 0; +inf to the rows of ``y`` where
    ``padding`` ``[B, M]`` is True."""
    y_norms = y.pow(2).sum(-1)
    if padding is not None:
        y_norms = y_norms.masked_fill(padding, math.inf)
    products = torch.baddbmm(x.pow(2).sum(-1).unsqueeze(-1), x, y.transpose(1, 2), alpha=-2)
    return products.add_(y_norms.unsqueeze(-2)).clamp_min_(0)


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """The rows ``index`` ``[B, M]`` of ``x`` ``[B, N, c]``: ``[B, M, c]``."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _descending(values: Tensor) -> Tensor:
    """The order ``[B, N]`` that sorts ``values`` ``[B, N]`` from largest to smallest, ties by lower index."""
    return stable_argsort(values, descending=True)


def _own_clusters(assign: Tensor, centres: Tensor) -> Tensor:
    """``assign`` ``[B, N]`` with centre ``centres[:, m]`` (``[B, M]``, distinct) put in cluster ``m``."""
    return assign.scatter(1, centres, torch.arange(centres.shape[1], device=centres.device).expand_as(centres))


def dpc_knn(features: Tensor, weights: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
    """DPC-KNN (density peaks with k nearest neighbours, as ClusTR's official code) of the rows of
    ``features`` ``[B, N, c]``, one pass. Rows of weight 0 (``weights`` ``[B, N]``) are padding.

    Distances are Euclidean divided by ``√c``. A real row's density is ``exp(−mean squared distance to
    its NEIGHBOURS nearest real rows)``, itself included (all real rows when the image has fewer); its
    indicator is its distance to the nearest denser real row (equal densities: the lower index is the
    denser), and for the densest row the largest distance between two real rows, which makes it the
    first centre. The ``clusters`` rows of highest density × indicator are the centres (real rows
    before padding; ties by lower index); each row joins its nearest centre (the first on a tie) and
    each centre its own cluster. Returns the centres ``[B, M]`` in score order (cluster ``m``'s centre
    is row ``centres[:, m]``) and the cluster of each row ``[B, N]``.
    """
    tokens = features.shape[1]
    real = weights > 0
    scaled = features / math.sqrt(features.shape[-1])
    squared = squared_distances(scaled, scaled, padding=~real)  # [B, N, N], +inf to padding
    squared = squared.masked_fill(torch.eye(tokens, dtype=torch.bool, device=squared.device), 0.0)
    nearest = squared.topk(min(NEIGHBOURS, tokens), dim=-1, largest=False).values  # [B, N, k]
    counted = torch.arange(nearest.shape[-1], device=features.device) < real.sum(-1)[:, None, None]
    mean = torch.where(counted, nearest, 0).sum(-1) / counted.sum(-1).clamp_min(1)
    log_density = torch.where(real, -mean, -math.inf)
    rank = stable_argsort(_descending(log_density))  # 0 = densest; padding after every real row
    not_denser = rank.unsqueeze(1) >= rank.unsqueeze(2)  # [B, i, j]: j is not denser than i
    indicator = squared.masked_fill(not_denser, math.inf).amin(-1)  # squared; +inf for the densest: first centre
    log_score = log_density + 0.5 * indicator.log()
    lowest = torch.finfo(log_score.dtype).min  # a real row scoring log 0 still comes before padding
    centres = _descending(torch.where(real, log_score.clamp_min(lowest), -math.inf))[:, :clusters]
    assign = squared.gather(2, centres.unsqueeze(1).expand(-1, tokens, -1)).argmin(-1)
    return centres, _own_clusters(assign, centres)


def farthest_point_seeds(features: Tensor, weights: Tensor, clusters: int) -> tuple[Tensor, Tensor]:
    """Farthest-point seeds for k-means of the rows of ``features`` ``[B, N, c]``. Rows of weight 0
    (``weights`` ``[B, N]``) are padding.

    The first seed is the real row farthest from the ``weights``-weighted mean; each next one the real
    row farthest from the seeds chosen so far (ties by lower index; padding only once every real row
    is a seed). Each row joins its nearest seed (the first on a tie) and each seed its own cluster.
    Returns the seeds ``[B, M]`` in the order chosen and the cluster of each row ``[B, N]``.
    """
    real = weights > 0
    total = weights.sum(-1)[:, None, None]
    mean = (features * weights.unsqueeze(-1)).sum(1, keepdim=True) * _inverse(total)
    priority = squared_distances(features, mean).squeeze(-1)
    taken = torch.zeros_like(real)
    seeds, columns = [], []
    for m in range(clusters):
        candidates = torch.where(real, priority, -1.0).masked_fill(taken, -math.inf)
        seed = candidates.argmax(-1, keepdim=True)
        column = squared_distances(features, _rows(features, seed)).squeeze(-1)
        taken = taken.scatter(1, seed, 1)  # 1, not True: torch.jit.trace has no bool value
        priority = column if m == 0 else priority.minimum(column)
        seeds.append(seed)
        columns.append(column)
    chosen = torch.cat(seeds, dim=1)
    return chosen, _own_clusters(torch.stack(columns, dim=-1).argmin(-1), chosen)


def lloyd(features: Tensor, weights: Tensor, centres: Tensor, assign: Tensor, iterations: int) -> Tensor:
    """Weighted Lloyd (k-means) iterations on ``features`` ``[B, N, c]`` from the clusters ``assign`` ``[B, N]``
    of the centres ``centres`` ``[B, M]``.

    Centroids start at the centres' rows. Each iteration moves every centroid to the ``weights``-weighted
    (``[B, N]``) mean of its members (an empty cluster keeps its centroid) and assigns every row to its
    nearest centroid (the lowest cluster index on a tie); a cluster whose centre is padding (weight 0)
    takes no rows. Returns the cluster of each row ``[B, N]`` (``assign`` for 0 iterations).
    """
    clusters = centres.shape[1]
    centroids = _rows(features, centres)
    dead = weights.gather(1, centres) <= 0
    weighted = torch.cat([features, torch.ones_like(features[..., :1])], dim=-1) * weights.unsqueeze(-1)
    for _ in range(iterations):
        sums = cluster_sums(weighted, assign, clusters)
        sizes = sums[..., -1:]
        centroids = torch.where(sizes > 0, sums[..., :-1] * _inverse(sizes), centroids)
        assign = squared_distances(features, centroids, padding=dead).argmin(-1)
    return assign


SEEDINGS: dict[str, Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]] = {
    "dpc": dpc_knn, "kmeans": farthest_point_seeds,
}


def cluster_assignment(
    k: Tensor, clusters: int, num_prefix: int, clustering: str, iterations: int, weights: Tensor
) -> Tensor:
    """The cluster ``[B, N − P]`` of each non-prefix key of ``k`` ``[B, H, N, d]`` (``clusters ≤ N − P``):
    ``clustering`` (``"dpc"``: :func:`dpc_knn`; ``"kmeans"``: :func:`farthest_point_seeds`) on the keys
    averaged over heads, then ``iterations`` :func:`lloyd` steps, weighted by ``weights`` ``[B, N]``."""
    features = k[:, :, num_prefix:].mean(dim=1).to(weights.dtype)
    weights = weights[:, num_prefix:]
    centres, assign = SEEDINGS[clustering](features, weights, clusters)
    return lloyd(features, weights, centres, assign, iterations)


def _token_major(x: Tensor) -> Tensor:
    """``[B, H, N, d]`` → ``[B, N, H·d]`` (a view where the heads of a token are adjacent in memory)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], x.shape[1] * x.shape[3])


def _head_major(x: Tensor, heads: int) -> Tensor:
    """``[B, M, H·d]`` → ``[B, H, M, d]``."""
    return x.view(x.shape[0], x.shape[1], heads, x.shape[2] // heads).transpose(1, 2)


def cluster_keys_values(
    k: Tensor, v: Tensor, clusters: int, num_prefix: int, clustering: str, iterations: int,
    attn_mask: Tensor | None = None, key_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """ClusTR's keys and values: the prefix tokens' own, then ``M`` cluster means.

    Clusters the non-prefix keys of ``k`` ``[B, H, N, d]`` (:func:`cluster_assignment`,
    ``M = min(clusters, N − P)``) and averages keys and values ``v`` ``[B, H, N, dv]`` per cluster, weighted
    by :func:`key_weights` of the per-key mask: ``attn_mask`` where it holds one value per key, else
    ``key_mask`` (broadcastable to ``[B, 1, 1, N]``; None: weight 1). Returns keys ``[B, H, P + M, d]``, values
    ``[B, H, P + M, dv]`` and the additive logit bias of each cluster, in ``k``'s dtype: ``log(weight)``
    ``[B, 1, 1, P + M]`` (−inf for an empty cluster), or, for an ``attn_mask`` ``[B | 1, H | 1, N, N]`` that
    differs per query or head, :func:`cluster_logit_bias` ``[B, H | 1, N, P + M]``.
    """
    batch, heads, tokens, _ = k.shape
    clusters = min(clusters, tokens - num_prefix)
    per_key = holds_one_value_per_key(attn_mask)
    weight_mask = attn_mask if per_key else key_mask
    weights = key_weights(weight_mask, batch, tokens, torch.promote_types(k.dtype, torch.float32), k.device)
    with torch.no_grad():
        assign = cluster_assignment(k, clusters, num_prefix, clustering, iterations, weights)
        prefix = torch.arange(num_prefix, device=k.device).expand(batch, num_prefix)
        slots = torch.cat([prefix, assign + num_prefix], dim=1)  # each prefix token is its own cluster
    sizes = cluster_sums(weights.unsqueeze(-1), slots, num_prefix + clusters)
    inverse = _inverse(sizes).to(k.dtype)

    def means(x: Tensor) -> Tensor:
        rows = _token_major(x)
        if weight_mask is not None:
            rows = rows * weights.unsqueeze(-1).to(x.dtype)
        return _head_major(cluster_sums(rows, slots, num_prefix + clusters) * inverse, heads)

    if per_key:
        bias = sizes[:, None, None, :, 0].log()
    else:
        bias = cluster_logit_bias(mask_4d(attn_mask), slots, num_prefix + clusters)
    return means(k), means(v), bias.to(k.dtype)


def _head_groups(attn_mask: Tensor | None, groups: int) -> list[Tensor | None]:
    """``attn_mask`` (broadcastable to ``[B, H, N, N]``) for each of ``groups`` equal consecutive head groups."""
    if attn_mask is None or attn_mask.dim() < 3 or attn_mask.shape[-3] == 1:
        return [attn_mask] * groups
    return list(attn_mask.chunk(groups, dim=-3))


@graph_op(reads_mask=True)
def clustered_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_clusters: tuple[int, ...],
    num_prefix: int,
    clustering: str,
    iterations: int,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Attention of every query ``q`` ``[B, H, N, d]`` to clustered keys and values (:func:`cluster_keys_values`).

    The heads are split into ``len(num_clusters)`` equal consecutive groups; group ``g`` clusters its
    keys into ``num_clusters[g]`` clusters (one entry: every head shares one clustering). Each group
    runs one fused ``scaled_dot_product_attention`` over ``P + M_g`` keys. ``k``/``v`` may have fewer
    heads than ``q`` (grouped-query attention). ``attn_mask`` is the SDPA call's (broadcastable to
    ``[B, H, N, N]``); where it differs per query or head, ``key_mask`` (``[B, 1, 1, N]``) is its per-key part,
    which weights the keys (:func:`cluster_keys_values`). Returns ``[B, H, N, dv]``, as the SDPA call it replaces.
    """
    k, v = match_heads(k, q.shape[1]), match_heads(v, q.shape[1])
    groups = len(num_clusters)
    outputs = []
    for qg, kg, vg, mask, clusters in zip(q.chunk(groups, 1), k.chunk(groups, 1), v.chunk(groups, 1),
                                          _head_groups(attn_mask, groups), num_clusters):
        keys, values, bias = cluster_keys_values(
            kg, vg, clusters, num_prefix, clustering, iterations, mask, key_mask)
        attended = F.scaled_dot_product_attention(qg, keys, values, attn_mask=bias, dropout_p=dropout_p, scale=scale)
        outputs.append(attended)
    return outputs[0] if groups == 1 else torch.cat(outputs, dim=1)


@graph_op(reads_mask=True)
def padded_cluster_keys_values(
    k: Tensor, v: Tensor, num_clusters: tuple[int, ...], num_prefix: int, clustering: str, iterations: int,
    attn_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`cluster_keys_values` for each head group of ``k`` ``[B, H, N, d]`` and ``v`` (as in
    :func:`clustered_attention`), for an explicit ``softmax(q @ kᵀ + bias) @ v``: groups with fewer
    clusters are padded with empty (−inf-biased) ones. Returns keys ``[B, H, P + M, d]``, values
    ``[B, H, P + M, dv]`` and the bias ``[B, 1, 1, P + M]`` (one group) or ``[B, H, 1, P + M]``, with
    ``M = max(num_clusters)``."""
    groups = len(num_clusters)
    parts = [cluster_keys_values(kg, vg, m, num_prefix, clustering, iterations, attn_mask)
             for kg, vg, m in zip(k.chunk(groups, 1), v.chunk(groups, 1), num_clusters)]
    if groups == 1:
        return parts[0]
    width = max(keys.shape[2] for keys, _, _ in parts)
    heads = k.shape[1] // groups

    def padded(index: int, value: float) -> Tensor:
        return torch.cat([F.pad(p[index], (0, 0, 0, width - p[index].shape[2]), value=value) for p in parts], dim=1)

    bias = [F.pad(b, (0, width - b.shape[-1]), value=-math.inf).expand(-1, heads, -1, -1) for _, _, b in parts]
    return padded(0, 0.0), padded(1, 0.0), torch.cat(bias, dim=1)
