"""Independent eager implementations of the methods, written against timm's VisionTransformer modules.

They follow the papers' code (EViT's ``Block.forward``), use no part of fxprune, and materialise the
full attention map, so they check fxprune's graph rewrite and its fused-attention scoring at once.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _attention(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention`` computed explicitly: (output [B, N, C], probabilities [B, H, N, N])."""
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(attn.norm(out)), probs


def _complement(index: torch.Tensor, n: int) -> torch.Tensor:
    """Indices in [0, n) that are not in ``index`` [B, K], ascending: [B, n - K]."""
    keep = torch.ones(index.shape[0], n, dtype=torch.bool, device=index.device)
    keep[torch.arange(index.shape[0]).unsqueeze(1), index] = False
    return torch.arange(n, device=index.device).expand(index.shape[0], n)[keep].view(index.shape[0], -1)


def _evit_tokens(x: torch.Tensor, probs: torch.Tensor, keep_rate: float, prefix: int, fuse: bool) -> torch.Tensor:
    B, N, C = x.shape
    cls_attn = probs[:, :, 0, prefix:].mean(dim=1)
    left = math.ceil(keep_rate * (N - prefix))
    if left >= N - prefix:
        return x
    _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
    non_cls = x[:, prefix:]
    x_others = torch.gather(non_cls, 1, idx.unsqueeze(-1).expand(-1, -1, C))
    parts = [x[:, :prefix], x_others]
    if fuse:
        compl = _complement(idx, N - prefix)
        non_topk = torch.gather(non_cls, 1, compl.unsqueeze(-1).expand(-1, -1, C))
        non_topk_attn = torch.gather(cls_attn, 1, compl)
        parts.append(torch.sum(non_topk * non_topk_attn.unsqueeze(-1), dim=1, keepdim=True))
    return torch.cat(parts, dim=1)


def evit_vit(model: nn.Module, images: torch.Tensor, keep_rate: float, layers, fuse: bool = True) -> torch.Tensor:
    """EViT (Top-K with ``fuse=False``) on a timm ``VisionTransformer``: logits."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for i, blk in enumerate(model.blocks):
        out, probs = _attention(blk.attn, blk.norm1(x))
        x = x + blk.drop_path1(blk.ls1(out))
        if i in layers:
            x = _evit_tokens(x, probs, keep_rate, prefix, fuse)
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return model.forward_head(model.norm(x))


def _tome_one_image(x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, r: int, prefix: int):
    """ToMe on one image, written as the paper states it, token by token: x [N, C], size [N], keys [N, c]."""
    n = x.shape[0]
    r = min(r, (n - prefix) // 2)
    if r <= 0:
        return x, size
    a_ids, b_ids = list(range(0, n, 2)), list(range(1, n, 2))
    unit = keys / keys.norm(dim=-1, keepdim=True)
    edges = []  # (similarity, a token, its most similar b token), protected tokens excluded
    for i in a_ids:
        if i < prefix:
            continue
        sims = [(float(unit[i] @ unit[j]), j) for j in b_ids if j >= prefix]
        best, j = max(sims, key=lambda t: t[0])
        edges.append((best, i, j))
    edges.sort(key=lambda t: -t[0])
    merged = {i: j for _, i, j in edges[:r]}
    total = {j: x[j] * size[j] for j in b_ids}
    mass = {j: size[j].clone() for j in b_ids}
    for i, j in merged.items():
        total[j] = total[j] + x[i] * size[i]
        mass[j] = mass[j] + size[i]
    kept_a = [i for i in a_ids if i not in merged]
    rows = [(i, x[i], size[i]) for i in kept_a] + [(j, total[j] / mass[j], mass[j]) for j in b_ids]
    # prefix tokens first in their original order, then unmerged A tokens, then B tokens
    order = [t for t in rows if t[0] < prefix] + [t for t in rows if t[0] >= prefix]
    return torch.stack([t[1] for t in order]), torch.stack([t[2] for t in order])


def _attention_with_sizes(attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None):
    """timm ``Attention`` with ToMe's proportional attention (``+ log size`` on the logits): (output,
    probabilities, keys, values)."""
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if size is not None:
        logits = logits + size.log()[:, None, None, :]
    probs = logits.softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(attn.norm(out)), probs, k, v


def _evit_sizes(size: torch.Tensor, probs: torch.Tensor, keep_rate: float, prefix: int, fuse: bool) -> torch.Tensor:
    """Sizes after EViT: kept tokens keep theirs, the fused token's (``fuse``) is the dropped tokens' total."""
    cls_attn = probs[:, :, 0, prefix:].mean(dim=1)
    left = math.ceil(keep_rate * (size.shape[1] - prefix))
    _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
    kept = torch.gather(size[:, prefix:], 1, idx)
    fused = size[:, prefix:].sum(1, keepdim=True) - kept.sum(1, keepdim=True)
    return torch.cat([size[:, :prefix], kept, fused] if fuse else [size[:, :prefix], kept], dim=1)


def tome_vit(
    model: nn.Module, images: torch.Tensor, r, layers, prop_attn: bool = True, evit: tuple | None = None,
    fuse: bool = True,
) -> torch.Tensor:
    """ToMe on a timm ``VisionTransformer``: logits. ``r`` an int or one value per layer; ``evit``:
    optionally ``(keep_rate, layers)`` of EViT (Top-K without ``fuse``) in other blocks, sizes carried
    through its selection."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    size = None
    for i, blk in enumerate(model.blocks):
        out, probs, k, _ = _attention_with_sizes(blk.attn, blk.norm1(x), size if prop_attn else None)
        x = x + blk.drop_path1(blk.ls1(out))
        if evit is not None and i in evit[1]:
            if size is not None:
                size = _evit_sizes(size, probs, evit[0], prefix, fuse)
            x = _evit_tokens(x, probs, evit[0], prefix, fuse=fuse)
        if i in layers:
            r_i = r if isinstance(r, int) else r[list(layers).index(i)]
            sizes = torch.ones(x.shape[:2], dtype=x.dtype) if size is None else size
            pairs = [_tome_one_image(x[b], sizes[b], k[b].mean(0), r_i, prefix) for b in range(x.shape[0])]
            x, size = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return model.forward_head(model.norm(x))


def _ats_tokens(x: torch.Tensor, probs: torch.Tensor, v: torch.Tensor, max_tokens: int, prefix: int) -> torch.Tensor:
    """ATS on one image as the paper states it: x [1, N, C], probs [1, H, N, N], v [1, H, N, d]."""
    n = x.shape[1]
    if max_tokens >= n:
        return x
    significance = probs[0, :, 0, prefix:].sum(0) * v[0].transpose(0, 1).reshape(n, -1).norm(dim=-1)[prefix:]
    significance = significance / significance.sum()
    scores, order = significance.sort()
    cdf = scores.cumsum(0)
    cdf = (cdf - cdf.min()) / (cdf.max() - cdf.min())
    start = cdf[cdf > 0].min()
    points = max_tokens - prefix
    ys = [start + (1 - start) * (i / (points - 1) if points > 1 else 0.0) for i in range(points)]
    picked = sorted({int((cdf - y).abs().argmin()) for y in ys})
    kept = [prefix + int(order[p]) for p in picked]
    return torch.cat([x[:, :prefix], x[:, kept]], dim=1)


def ats_vit(model: nn.Module, images: torch.Tensor, max_tokens: int, layers) -> torch.Tensor:
    """ATS on a timm ``VisionTransformer``, one image at a time (each keeps its own number of tokens): logits."""
    prefix = model.num_prefix_tokens
    outputs = []
    for image in images:
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))
        for i, blk in enumerate(model.blocks):
            out, probs, _, v = _attention_with_sizes(blk.attn, blk.norm1(x), None)
            x = x + blk.drop_path1(blk.ls1(out))
            if i in layers:
                x = _ats_tokens(x, probs, v, max_tokens, prefix)
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        outputs.append(model.forward_head(model.norm(x)))
    return torch.cat(outputs)


def _grid_partition(tokens: int, clusters: int) -> list[int]:
    """ClusTR's initial partition, written out: near-equal cells of the square token grid (rows × cols
    with rows the largest divisor of ``clusters`` not above its square root and cols ≤ the grid side),
    else near-equal runs of the sequence."""
    side = math.isqrt(tokens)
    divisors = [r for r in range(1, math.isqrt(clusters) + 1) if clusters % r == 0 and clusters // r <= side]
    if side * side != tokens or not divisors:
        return [math.floor(i * clusters / tokens) for i in range(tokens)]
    rows = max(divisors)
    cols = clusters // rows
    return [math.floor((i // side) * rows / side) * cols + math.floor((i % side) * cols / side) for i in range(tokens)]


def _kmeans(
    points: torch.Tensor, weights: torch.Tensor, labels: list[int], clusters: int, iterations: int
) -> list[int]:
    """Weighted Lloyd's algorithm on ``points`` [n, c]: centroid = weighted mean of its members (kept when
    it has none), then each point to its nearest centroid (first on a tie)."""
    centroids = torch.zeros(clusters, points.shape[1], dtype=points.dtype)
    for _ in range(iterations):
        for c in range(clusters):
            members = [i for i, label in enumerate(labels) if label == c]
            total = sum(float(weights[i]) for i in members)
            if total > 0:
                centroids[c] = sum(weights[i] * points[i] for i in members) / total
        labels = [int(torch.cdist(points[i : i + 1], centroids)[0].argmin()) for i in range(points.shape[0])]
    return labels


def _clustered_head_group(q, k, v, scale, clusters: int, prefix: int, iterations: int, size):
    """Clustered attention for one image and one group of heads: q, k, v [h, N, d]; size [N] or None."""
    n = k.shape[1] - prefix
    clusters = min(clusters, n)
    weights = torch.ones(k.shape[1], dtype=k.dtype) if size is None else size
    labels = _kmeans(k[:, prefix:].mean(0), weights[prefix:], _grid_partition(n, clusters), clusters, iterations)
    keys, values, logw = [k[:, :prefix]], [v[:, :prefix]], [weights[:prefix].log()]
    for c in range(clusters):
        members = [prefix + i for i, label in enumerate(labels) if label == c]
        total = weights[members].sum()
        share = (weights[members] / total)[None, :, None] if members else None
        keys.append((k[:, members] * share).sum(1, keepdim=True) if members else torch.zeros_like(k[:, :1]))
        values.append((v[:, members] * share).sum(1, keepdim=True) if members else torch.zeros_like(v[:, :1]))
        logw.append(total.log().reshape(1) if members else torch.full((1,), -math.inf, dtype=k.dtype))
    keys, values, logw = torch.cat(keys, 1), torch.cat(values, 1), torch.cat(logw)
    return (((q * scale) @ keys.transpose(-2, -1)) + logw).softmax(-1) @ values


def clustr_attention(attn: nn.Module, x: torch.Tensor, scales, prefix: int, iterations: int, size=None):
    """timm ``Attention`` with ClusTR, one image at a time; ``scales``: cluster count per head group; ``size``
    [B, N] or None: token sizes (ToMe), the weights of the cluster means."""
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    group = attn.num_heads // len(scales)
    out = torch.stack([
        torch.cat([
            _clustered_head_group(q[b, g * group:(g + 1) * group], k[b, g * group:(g + 1) * group],
                                  v[b, g * group:(g + 1) * group], attn.scale, m, prefix, iterations,
                                  None if size is None else size[b])
            for g, m in enumerate(scales)
        ])
        for b in range(B)
    ])
    return attn.proj(attn.norm(out.transpose(1, 2).reshape(B, N, C)))


def clustr_vit(model: nn.Module, images: torch.Tensor, scales, layers, iterations: int, tome=None) -> torch.Tensor:
    """ClusTR at ``layers`` of a timm ``VisionTransformer``: logits. ``tome=(r, layers)`` merges tokens
    first (ToMe, token sizes carried into the clustering as weights)."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    size = None
    for i, blk in enumerate(model.blocks):
        if i in layers:
            out = clustr_attention(blk.attn, blk.norm1(x), scales, prefix, iterations, size)
        else:
            out, _, k, _ = _attention_with_sizes(blk.attn, blk.norm1(x), size)
        x = x + blk.drop_path1(blk.ls1(out))
        if tome is not None and i in tome[1]:
            sizes = torch.ones(x.shape[:2], dtype=x.dtype) if size is None else size
            pairs = [_tome_one_image(x[b], sizes[b], k[b].mean(0), tome[0], prefix) for b in range(x.shape[0])]
            x, size = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return model.forward_head(model.norm(x))
