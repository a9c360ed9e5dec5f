"""Independent eager implementations of the methods, written against timm's VisionTransformer modules.

They follow the papers' code (EViT's ``Block.forward``), use no part of fxprune, and materialise the
full attention map, so they check fxprune's graph rewrite and its fused-attention scoring at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


def attention_scores(probs: torch.Tensor, prefix: int, cls: bool = True) -> torch.Tensor:
    """Head-averaged token scores of the non-prefix tokens from attention probabilities [B, H, N, N]: the class
    token's row, or (not ``cls``) the attention each token receives, averaged over every query: [B, N - prefix]."""
    return (probs[:, :, 0] if cls else probs.mean(dim=2)).mean(dim=1)[:, prefix:]


def reads_class_token(model: nn.Module) -> bool:
    """Whether a timm ``VisionTransformer``'s head reads its class token (else it pools)."""
    return model.global_pool == "token"


def pooled_head(model: nn.Module, x: torch.Tensor, size: torch.Tensor | None = None) -> torch.Tensor:
    """A timm ``VisionTransformer``'s head on its final tokens [B, N, C] (after ``norm``); a mean pool weights
    each token by its size [B, N] when given."""
    if model.global_pool != "avg" or size is None:
        return model.forward_head(x)
    prefix = model.num_prefix_tokens
    weights = size[:, prefix:, None]
    pooled = (x[:, prefix:] * weights).sum(1) / weights.sum(1)
    return model.head(model.head_drop(model.fc_norm(pooled)))


def _evit_tokens(
    x: torch.Tensor, probs: torch.Tensor, keep_rate: float, prefix: int, fuse: bool, cls: bool = True
) -> torch.Tensor:
    B, N, C = x.shape
    cls_attn = attention_scores(probs, prefix, cls)
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
            x = _evit_tokens(x, probs, keep_rate, prefix, fuse, reads_class_token(model))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return model.forward_head(model.norm(x))


def _talking_heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CaiT's ``TalkingHeadAttn`` computed explicitly: (output [B, N, C], the softmax's probabilities [B, H, N, N],
    before the heads are mixed again)."""
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * attn.scale, qkv[1], qkv[2]
    probs = attn.proj_l((q @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(dim=-1)
    mixed = attn.proj_w(probs.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return attn.proj((mixed @ v).transpose(1, 2).reshape(B, N, C)), probs


def cait_vit(model: nn.Module, images: torch.Tensor, keep_rate: float, layers, fuse: bool) -> torch.Tensor:
    """EViT (Top-K without ``fuse``) in the self-attention blocks of a timm ``Cait``, which have no class token:
    tokens ranked by the attention they receive; then its class-attention stage and head. Logits."""
    x = model.pos_drop(model.patch_embed(images) + model.pos_embed)
    for i, blk in enumerate(model.blocks):
        out, probs = _talking_heads(blk.attn, blk.norm1(x))
        x = x + blk.drop_path(blk.gamma_1 * out)
        if i in layers:
            x = _evit_tokens(x, probs, keep_rate, 0, fuse, cls=False)
        x = x + blk.drop_path(blk.gamma_2 * blk.mlp(blk.norm2(x)))
    summary = model.cls_token.expand(x.shape[0], -1, -1)
    for blk in model.blocks_token_only:
        summary = blk(x, summary)
    return model.forward_head(model.norm(torch.cat((summary, x), dim=1)))


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


def _proportional(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, size: torch.Tensor | None):
    """Attention of ``q``, ``k``, ``v`` [B, H, N, d] with ToMe's ``+ log size`` on the logits when ``size`` [B, N]
    is given: (heads joined [B, N, H·d], probabilities [B, H, N, N])."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if size is not None:
        logits = logits + size.log()[:, None, None, :]
    probs = logits.softmax(dim=-1)
    return (probs @ v).transpose(1, 2).flatten(2), probs


def _attention_with_sizes(attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None):
    """timm ``Attention`` with ToMe's proportional attention (``+ log size`` on the logits): (output,
    probabilities, keys, values)."""
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out, probs = _proportional(q, k, v, attn.scale, size)
    return attn.proj(attn.norm(out)), probs, k, v


def _parallel_block(blk: nn.Module, x: torch.Tensor, size: torch.Tensor | None):
    """timm ``ParallelScalingBlock`` (ViT-22B's parallel block: attention and MLP from one projection of the
    normed input, both added to it) computed explicitly, with ToMe's ``+ log size`` on the logits when ``size`` is
    given: (block output [B, N, C], probabilities, keys, values)."""
    B, N, C = x.shape
    hidden, q, k, v = blk.in_proj(blk.in_norm(x)).split(blk.in_split, dim=-1)
    hidden = hidden if blk.mlp_bias is None else hidden + blk.mlp_bias
    q, k, v = (t.reshape(B, N, blk.num_heads, blk.head_dim).transpose(1, 2) for t in (q, k, v))
    q, k = blk.q_norm(q), blk.k_norm(k)
    attended, probs = _proportional(q, k, v, blk.scale, size)
    hidden = blk.mlp_drop(blk.mlp_act(hidden))
    if blk.out_proj is not None:
        out = blk.out_proj(torch.cat((attended, hidden), dim=-1))
    else:
        out = blk.attn_out_proj(attended) + blk.mlp_out_proj(hidden)
    return x + blk.drop_path(blk.ls(out)), probs, k, v


def _evit_sizes(
    size: torch.Tensor, probs: torch.Tensor, keep_rate: float, prefix: int, fuse: bool, cls: bool = True
) -> torch.Tensor:
    """Sizes after EViT: kept tokens keep theirs, the fused token's (``fuse``) is the dropped tokens' total."""
    cls_attn = attention_scores(probs, prefix, cls)
    left = math.ceil(keep_rate * (size.shape[1] - prefix))
    if left >= size.shape[1] - prefix:
        return size
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
                size = _evit_sizes(size, probs, evit[0], prefix, fuse, reads_class_token(model))
            x = _evit_tokens(x, probs, evit[0], prefix, fuse, reads_class_token(model))
        if i in layers:
            r_i = r if isinstance(r, int) else r[list(layers).index(i)]
            sizes = torch.ones(x.shape[:2], dtype=x.dtype) if size is None else size
            pairs = [_tome_one_image(x[b], sizes[b], k[b].mean(0), r_i, prefix) for b in range(x.shape[0])]
            x, size = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return pooled_head(model, model.norm(x), size)


def _ats_budget(n: int, cap) -> int:
    """Most tokens ATS keeps of ``n`` (the official rules: a count, a ratio with at least 8, or no cap)."""
    if cap is None:
        return n
    if isinstance(cap, float):
        return min(n, max(8, round(cap * n)))
    return min(cap, n)


def ats_one_image(x, size, probs, v, cap, prefix: int, ref_tokens: int, cls: bool = True):
    """ATS on one image by the official code's rules: x [1, N, C], size [1, N] or None, probs [1, H, N, N],
    v [1, H, N, d]; ``ref_tokens`` points minus the prefix, the ``budget − P`` most significant distinct picks
    (scored by the class row, or, not ``cls``, by the attention each token receives)."""
    n = x.shape[1]
    attention = attention_scores(probs, prefix, cls)[0]
    significance = attention * v[0].transpose(0, 1).reshape(n, -1).norm(dim=-1)[prefix:]
    significance = significance / significance.sum()
    scores, order = significance.sort(stable=True)
    cdf = scores.cumsum(0)
    cdf = (cdf - cdf.min()) / (cdf.max() - cdf.min())
    start = float(cdf[cdf > 0].min())
    points = ref_tokens - prefix
    ys = [start + (i - start * i) / (points - 1) for i in range(points)]
    picks = sorted({int((cdf - y).abs().argmin()) for y in ys})  # argmin: the first of equal distances
    picks = picks[len(picks) - min(len(picks), _ats_budget(n, cap) - prefix):]
    kept = list(range(prefix)) + [prefix + int(order[p]) for p in picks]
    return x[:, kept], None if size is None else size[:, kept]


def reduced_vit(
    model: nn.Module, images: torch.Tensor, steps: dict, proportional_after: int | None = None
) -> torch.Tensor:
    """A timm ``VisionTransformer`` run one image at a time, with ``steps[i](x, size, probs, keys, values)``
    ``-> (x, size)`` after the residual add of block ``i``'s attention, or after a parallel block (sizes start as
    None; the attention of the blocks after ``proportional_after``, ToMe's first block, adds ``log size``): logits.
    Each image keeps its own number of tokens, so this is what each image gets alone."""
    outputs = []
    for image in images:
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))
        size = None
        for i, blk in enumerate(model.blocks):
            proportional = proportional_after is not None and i > proportional_after
            parallel = hasattr(blk, "in_proj")
            if parallel:
                x, probs, k, v = _parallel_block(blk, x, size if proportional else None)
            else:
                out, probs, k, v = _attention_with_sizes(blk.attn, blk.norm1(x), size if proportional else None)
                x = x + blk.drop_path1(blk.ls1(out))
            if i in steps:
                x, size = steps[i](x, size, probs, k, v)
            if not parallel:
                x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        outputs.append(pooled_head(model, model.norm(x), size))
    return torch.cat(outputs)


def ats_step(model: nn.Module, cap, ref_tokens: int | None = None):
    """An ATS step for :func:`reduced_vit` (sizes start at one per token)."""
    prefix = model.num_prefix_tokens
    ref_tokens = ref_tokens or model.patch_embed.num_patches + prefix

    def step(x, size, probs, k, v):
        size = torch.ones(x.shape[:2], dtype=x.dtype) if size is None else size
        return ats_one_image(x, size, probs, v, cap, prefix, ref_tokens, reads_class_token(model))

    return step


def ats_vit(model: nn.Module, images: torch.Tensor, cap, layers) -> torch.Tensor:
    """ATS on a timm ``VisionTransformer``, one image at a time (each keeps its own number of tokens): logits."""
    caps = cap if isinstance(cap, tuple) else (cap,) * len(layers)
    return reduced_vit(model, images, {layer: ats_step(model, c) for layer, c in zip(layers, caps)})


def evit_step(model: nn.Module, keep_rate: float, fuse: bool = True):
    """An EViT (Top-K without ``fuse``) step for :func:`reduced_vit`, sizes carried through its selection."""
    prefix = model.num_prefix_tokens

    def step(x, size, probs, k, v):
        cls = reads_class_token(model)
        if size is not None:
            size = _evit_sizes(size, probs, keep_rate, prefix, fuse, cls)
        return _evit_tokens(x, probs, keep_rate, prefix, fuse, cls), size

    return step


def tome_step(model: nn.Module, r: int):
    """A ToMe step for :func:`reduced_vit`."""
    prefix = model.num_prefix_tokens

    def step(x, size, probs, k, v):
        sizes = torch.ones(x.shape[1], dtype=x.dtype) if size is None else size[0]
        merged, merged_size = _tome_one_image(x[0], sizes, k[0].mean(0), r, prefix)
        return merged[None], merged_size[None]

    return step


def _dpc_knn(points: torch.Tensor, clusters: int, neighbours: int = 5) -> tuple[list[int], list[int]]:
    """DPC-KNN as ClusTR's official ``cluster_dpc_knn_ms`` states it, on one image's points [n, c], with
    density ties broken by the lower index instead of random noise: (centres, label of each point)."""
    n, c = points.shape
    dist = torch.cdist(points, points) / math.sqrt(c)
    density = [math.exp(-float((dist[i].sort().values[:neighbours] ** 2).mean())) for i in range(n)]

    def denser(j: int, i: int) -> bool:
        return density[j] > density[i] or (density[j] == density[i] and j < i)

    largest = float(dist.max())
    indicator = [min([float(dist[i, j]) for j in range(n) if denser(j, i)], default=largest) for i in range(n)]
    score = [density[i] * indicator[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: (-score[i], i))[:clusters]
    labels = [min(range(clusters), key=lambda m: (float(dist[i, centres[m]]), m)) for i in range(n)]
    for m, centre in enumerate(centres):
        labels[centre] = m
    return centres, labels


def _farthest_points(points: torch.Tensor, weights: torch.Tensor, clusters: int) -> tuple[list[int], list[int]]:
    """k-means seeds on points [n, c]: the point farthest from the weighted mean, then repeatedly the point
    farthest from the seeds so far (the first on a tie); each point labelled by its nearest seed, each seed
    by its own: (seeds, label of each point)."""
    n = points.shape[0]
    mean = (weights[:, None] * points).sum(0) / weights.sum()
    seeds = [max(range(n), key=lambda i: (float((points[i] - mean).norm()), -i))]
    while len(seeds) < clusters:
        gap = [min(float((points[i] - points[s]).norm()) for s in seeds) for i in range(n)]
        seeds.append(max((i for i in range(n) if i not in seeds), key=lambda i: (gap[i], -i)))
    labels = [min(range(clusters), key=lambda m: (float((points[i] - points[seeds[m]]).norm()), m)) for i in range(n)]
    for m, seed in enumerate(seeds):
        labels[seed] = m
    return seeds, labels


def _lloyd(points: torch.Tensor, weights: torch.Tensor, centres: list[int], labels: list[int], iterations: int):
    """Weighted Lloyd's algorithm on ``points`` [n, c] from the labels of the centre points ``centres``:
    centroid = weighted mean of its members (kept when it has none), then each point to its nearest
    centroid (first on a tie)."""
    centroids = points[centres].clone()
    for _ in range(iterations):
        for c in range(len(centres)):
            members = [i for i, label in enumerate(labels) if label == c]
            total = sum(float(weights[i]) for i in members)
            if total > 0:
                centroids[c] = sum(weights[i] * points[i] for i in members) / total
        labels = [int(torch.cdist(points[i : i + 1], centroids)[0].argmin()) for i in range(points.shape[0])]
    return labels


def _clustered_head_group(q, k, v, scale, clusters: int, prefix: int, clustering: str, iterations: int, size,
                          bias=None):
    """Clustered attention for one image and one group of heads: q, k, v [h, N, d]; size [N] or None; bias
    [h, N, N] or None: a bias per query and key, which gives query i the bias log Σ_{j in c} size_j exp(bias_ij)
    to cluster c (then without log(size))."""
    n = k.shape[1] - prefix
    clusters = min(clusters, n)
    weights = torch.ones(k.shape[1], dtype=k.dtype) if size is None else size
    points = k[:, prefix:].mean(0)
    if clustering == "dpc":
        centres, labels = _dpc_knn(points, clusters)
    else:
        centres, labels = _farthest_points(points, weights[prefix:], clusters)
    labels = _lloyd(points, weights[prefix:], centres, labels, iterations)
    keys, values, logw = [k[:, :prefix]], [v[:, :prefix]], [weights[:prefix].log()]
    for c in range(clusters):
        members = [prefix + i for i, label in enumerate(labels) if label == c]
        total = weights[members].sum()
        share = (weights[members] / total)[None, :, None] if members else None
        keys.append((k[:, members] * share).sum(1, keepdim=True) if members else torch.zeros_like(k[:, :1]))
        values.append((v[:, members] * share).sum(1, keepdim=True) if members else torch.zeros_like(v[:, :1]))
        logw.append(total.log().reshape(1) if members else torch.full((1,), -math.inf, dtype=k.dtype))
    keys, values, logw = torch.cat(keys, 1), torch.cat(values, 1), torch.cat(logw)
    if bias is not None:
        logw = torch.stack([(bias[:, :, members] + weights[members].log()).logsumexp(-1) if members
                            else torch.full(bias.shape[:2], -math.inf, dtype=k.dtype)
                            for members in [[j] for j in range(prefix)]
                            + [[prefix + i for i, label in enumerate(labels) if label == c] for c in range(clusters)]],
                           dim=-1)
    return (((q * scale) @ keys.transpose(-2, -1)) + logw).softmax(-1) @ values


def clustr_attention(
    attn: nn.Module, x: torch.Tensor, scales, prefix: int, clustering: str, iterations: int, size=None
):
    """timm ``Attention`` with ClusTR, one image at a time; ``scales``: cluster count per head group;
    ``clustering``: ``"dpc"`` or ``"kmeans"``, then ``iterations`` Lloyd steps; ``size`` [B, N] or None:
    token sizes (ToMe), the weights of the cluster means."""
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    group = attn.num_heads // len(scales)
    out = torch.stack([
        torch.cat([
            _clustered_head_group(q[b, g * group:(g + 1) * group], k[b, g * group:(g + 1) * group],
                                  v[b, g * group:(g + 1) * group], attn.scale, m, prefix, clustering, iterations,
                                  None if size is None else size[b])
            for g, m in enumerate(scales)
        ])
        for b in range(B)
    ])
    return attn.proj(attn.norm(out.transpose(1, 2).reshape(B, N, C)))


def clustr_beit(model: nn.Module, images: torch.Tensor, scales, layers, clustering: str, iterations: int):
    """ClusTR at ``layers`` of a timm ``Beit`` (a relative position bias per block, none shared): logits."""
    x = model.patch_embed(images)
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = x if model.pos_embed is None else x + model.pos_embed
    for i, blk in enumerate(model.blocks):
        if i not in layers:
            x = blk(x)
            continue
        attn, h = blk.attn, blk.norm1(x)
        B, N, C = h.shape
        qkv = F.linear(h, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = attn._get_rel_pos_bias().reshape(attn.num_heads, N, N)
        group = attn.num_heads // len(scales)
        heads = [slice(g * group, (g + 1) * group) for g in range(len(scales))]
        out = torch.stack([
            torch.cat([_clustered_head_group(q[b, hs], k[b, hs], v[b, hs], attn.scale, m, 1, clustering, iterations,
                                             None, bias[hs]) for hs, m in zip(heads, scales)])
            for b in range(B)
        ])
        out = attn.proj(out.transpose(1, 2).reshape(B, N, C))
        x = x + (out if blk.gamma_1 is None else blk.gamma_1 * out)
        mlp = blk.mlp(blk.norm2(x))
        x = x + (mlp if blk.gamma_2 is None else blk.gamma_2 * mlp)
    return model.forward_head(model.norm(x))


def clustr_vit(
    model: nn.Module, images: torch.Tensor, scales, layers, clustering: str, iterations: int, tome=None
) -> torch.Tensor:
    """ClusTR at ``layers`` of a timm ``VisionTransformer``: logits. ``tome=(r, layers)`` merges tokens
    first (ToMe, token sizes carried into the clustering as weights)."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    size = None
    for i, blk in enumerate(model.blocks):
        if i in layers:
            out = clustr_attention(blk.attn, blk.norm1(x), scales, prefix, clustering, iterations, size)
        else:
            out, _, k, _ = _attention_with_sizes(blk.attn, blk.norm1(x), size)
        x = x + blk.drop_path1(blk.ls1(out))
        if tome is not None and i in tome[1]:
            sizes = torch.ones(x.shape[:2], dtype=x.dtype) if size is None else size
            pairs = [_tome_one_image(x[b], sizes[b], k[b].mean(0), tome[0], prefix) for b in range(x.shape[0])]
            x, size = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return model.forward_head(model.norm(x))


def _predictor_lg(predictor: nn.Module, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """DynamicViT's ``PredictorLG.forward`` on patch tokens ``x`` [B, N, C] and the keep policy [B, N, 1], written
    from the official code with the weights of ``predictor`` (a module with ``in_conv``/``out_conv`` layers)."""
    norm, first = predictor.in_conv[0], predictor.in_conv[1]
    x = torch.nn.functional.gelu(first(torch.nn.functional.layer_norm(x, norm.normalized_shape, norm.weight,
                                                                       norm.bias, norm.eps)))
    B, N, C = x.shape
    local_x = x[:, :, : C // 2]
    global_x = (x[:, :, C // 2 :] * policy).sum(dim=1, keepdim=True) / torch.sum(policy, dim=1, keepdim=True)
    x = torch.cat([local_x, global_x.expand(B, N, C // 2)], dim=-1)
    linears = [m for m in predictor.out_conv if isinstance(m, nn.Linear)]
    for linear in linears[:-1]:
        x = torch.nn.functional.gelu(linear(x))
    return torch.log_softmax(linears[-1](x), dim=-1)


def _policy_attention(attn: nn.Module, x: torch.Tensor, policy: torch.Tensor | None) -> torch.Tensor:
    """timm ``Attention`` with DynamicViT's ``softmax_with_policy`` (eps 1e-6) when ``policy`` [B, N, 1] is given."""
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if policy is None:
        probs = logits.softmax(dim=-1)
    else:
        eps = 1e-6
        gate = policy.reshape(B, 1, 1, N)
        eye = torch.eye(N, dtype=gate.dtype).view(1, 1, N, N)
        gate = gate + (1.0 - gate) * eye
        weights = (logits - logits.max(dim=-1, keepdim=True)[0]).to(torch.float32).exp() * gate.to(torch.float32)
        probs = ((weights + eps / N) / (weights.sum(dim=-1, keepdim=True) + eps)).to(logits.dtype)
    out = (probs @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(attn.norm(out))


def dynamicvit_vit(model: nn.Module, predictors, images: torch.Tensor, keep_rate: float, layers, training: bool):
    """DynamicViT on a timm ``VisionTransformer`` as the official ``VisionTransformerDiffPruning.forward`` runs it
    (``predictors``: one per stage): logits. In training, decisions are hard Gumbel-softmax samples (the caller
    seeds the generator) and tokens are masked, from the first stage on; in evaluation the top
    ``int(N0 · keep_rate^s)`` patch tokens by keep score are kept."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    B, init_n = x.shape[0], x.shape[1] - prefix
    prev_decision = torch.ones(B, init_n, 1, dtype=x.dtype)
    policy = None
    for i, blk in enumerate(model.blocks):
        if i in layers:
            stage = layers.index(i)
            pred_score = _predictor_lg(predictors[stage], x[:, prefix:], prev_decision)
            if training:
                hard_keep_decision = torch.nn.functional.gumbel_softmax(pred_score, hard=True)[:, :, 0:1]
                hard_keep_decision = hard_keep_decision * prev_decision
                policy = torch.cat([torch.ones(B, prefix, 1, dtype=x.dtype), hard_keep_decision], dim=1)
                prev_decision = hard_keep_decision
            else:
                num_keep_node = int(init_n * keep_rate ** (stage + 1))
                keep_policy = torch.argsort(pred_score[:, :, 0], dim=1, descending=True)[:, :num_keep_node]
                kept = torch.gather(x[:, prefix:], 1, keep_policy.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
                x = torch.cat([x[:, :prefix], kept], dim=1)
                prev_decision = torch.gather(prev_decision, 1, keep_policy.unsqueeze(-1))
        x = x + blk.drop_path1(blk.ls1(_policy_attention(blk.attn, blk.norm1(x), policy)))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return model.forward_head(model.norm(x))


def dynamicvit_step(predictor: nn.Module, keep: int, prefix: int):
    """A DynamicViT evaluation step for :func:`reduced_vit` (the selection before the next block): the ``keep``
    patch tokens of the highest keep score, in the order of their scores, sizes carried along."""

    def step(x, size, probs, k, v):
        decision = torch.ones(1, x.shape[1] - prefix, 1, dtype=x.dtype)
        order = torch.argsort(_predictor_lg(predictor, x[:, prefix:], decision)[0, :, 0], descending=True)[:keep]
        rows = torch.cat([torch.arange(prefix), prefix + order])
        return x[:, rows], None if size is None else size[:, rows]

    return step


def _usage_decision(logits: torch.Tensor, threshold: float, training: bool) -> torch.Tensor:
    """AdaViT's ``_gumbel_sigmoid`` (hard): Gumbel noise and τ = 5 in training (two Exp(1) draws, in order),
    neither at evaluation."""
    if training:
        g1 = -torch.empty_like(logits).exponential_().log()
        g2 = -torch.empty_like(logits).exponential_().log()
        soft = torch.sigmoid((logits + g1 - g2) / 5.0)
    else:
        soft = torch.sigmoid(logits)
    return (soft > threshold).to(soft.dtype) - soft.detach() + soft


def _adavit_blocks(x: torch.Tensor, blocks, gates: dict, prefix: int, token_only, training: bool, attend,
                   dense=lambda blk, x: blk(x)) -> torch.Tensor:
    """The blocks of a pre-norm ViT as the official ``StepAdaBlock.forward`` runs them with ``--ada-head
    --ada-layer --ada-token-with-mlp``, on ``x`` ``[B, N, C]``. ``attend(block, xn, head, pair)``: the block's
    attention on its normed input with each image's head decisions ``head`` ``[B, H]`` (or None) and the pairs of
    used tokens ``pair`` ``[B, 1, N, N]``, before its output projection's token factor; ``dense(block, x)``: a
    block without decisions."""
    B, N, C = x.shape
    for i, blk in enumerate(blocks):
        if i not in gates:
            x = dense(blk, x)
            continue
        full = i not in token_only
        head = _usage_decision(gates[i]["heads"](x[:, 0]), 0.5, training) if full else None
        layer = _usage_decision(gates[i]["sublayers"](x[:, 0]), 0.5, training) if full else None
        xn = blk.norm1(x)
        token = _usage_decision(gates[i]["tokens"](xn[:, prefix:]), 0.6, training)
        token = torch.cat([torch.ones(B, prefix, 1, dtype=x.dtype), token], dim=1)
        out = _layer_scale(blk, 1, attend(blk, xn, head, (token @ token.transpose(1, 2)).detach()[:, None])) * token
        x = x + (out * layer[:, 0, None, None] if full else out)
        mlp_in = blk.norm2(x)
        if full:
            mlp_in = mlp_in * head.repeat_interleave(C // blk.attn.num_heads, dim=1)[:, None]
        out = _layer_scale(blk, 2, blk.mlp(mlp_in)) * token
        x = x + (out * layer[:, 1, None, None] if full else out)
    return x


def _layer_scale(blk: nn.Module, which: int, out: torch.Tensor) -> torch.Tensor:
    """``out`` times the block's layer scale of sub-layer ``which`` (1: attention, 2: MLP): timm
    ``VisionTransformer``'s ``ls1``/``ls2``, ``Eva``'s ``gamma_1``/``gamma_2`` (None: none)."""
    if hasattr(blk, f"ls{which}"):
        return getattr(blk, f"ls{which}")(out)
    gamma = getattr(blk, f"gamma_{which}", None)
    return out if gamma is None else gamma * out


def _official_attention(blk: nn.Module, xn: torch.Tensor, head: torch.Tensor | None, pair: torch.Tensor):
    """A timm ``Attention`` written out as the official AdaViT block does: heads zeroed, logits of unused pairs
    −inf except each token's own, the heads' outputs zeroed, projected."""
    attn, (B, N, C) = blk.attn, xn.shape
    hd = C // attn.num_heads
    q, k, v = attn.qkv(xn).reshape(B, N, 3, attn.num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if head is not None:
        q, k, v = (t * head[:, :, None, None] for t in (q, k, v))
    logits = q @ k.transpose(-2, -1) * attn.scale
    logits = torch.where(pair + torch.eye(N, dtype=xn.dtype) > 0, logits * pair, float("-inf"))
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
    if head is not None:
        out = out * head.repeat_interleave(hd, dim=1)[:, None]
    return attn.proj(out)


def adavit_vit(model: nn.Module, gates: dict, images: torch.Tensor, token_only=(), training: bool = False):
    """AdaViT on a timm ``VisionTransformer`` (the official block, :func:`_adavit_blocks`): logits. ``gates``:
    block index → its decision heads (``heads``, ``sublayers``, ``tokens``; blocks in ``token_only`` have
    ``tokens`` only)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    x = _adavit_blocks(x, model.blocks, gates, model.num_prefix_tokens, token_only, training, _official_attention)
    return model.forward_head(model.norm(x))


def adavit_own_attention(model: nn.Module, gates: dict, tokens: torch.Tensor, token_only=(), training: bool = False,
                         **attention_kwargs) -> torch.Tensor:
    """AdaViT on a timm ViT whose blocks take ``attention_kwargs`` (Eva's ``rope``, ``VisionTransformerRelPos``'s
    ``shared_rel_pos``), from its embedded ``tokens`` ``[B, N, C]``: the official block (:func:`_adavit_blocks`)
    around each block's own attention, whose fused attention call gets the heads zeroed at its inputs and output
    and the pairs of used tokens (and each token's own) as its mask, beside any mask (a position bias) it has:
    logits."""
    fused = F.scaled_dot_product_attention

    def attend(blk: nn.Module, xn: torch.Tensor, head: torch.Tensor | None, pair: torch.Tensor) -> torch.Tensor:
        factor = 1.0 if head is None else head[:, :, None, None]

        def gated(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
            allowed = (pair + torch.eye(q.shape[-2], dtype=q.dtype)) > 0
            mask = allowed if attn_mask is None else attn_mask.masked_fill(~allowed, float("-inf"))
            return fused(q * factor, k * factor, v * factor, attn_mask=mask, scale=scale) * factor

        F.scaled_dot_product_attention = gated
        try:
            return blk.attn(xn, **attention_kwargs)
        finally:
            F.scaled_dot_product_attention = fused

    x = _adavit_blocks(tokens, model.blocks, gates, model.num_prefix_tokens, token_only, training, attend,
                       lambda blk, x: blk(x, **attention_kwargs))
    return model.forward_head(model.norm(x))


def with_keys_masked(model: nn.Module, image: torch.Tensor, kept: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """The dense ``model`` (timm, fused attention) on one ``image`` ``[1, 3, H, W]`` in which, from block ``start``
    of each ``(start, rows)`` in ``kept`` on, only the original token rows ``rows`` are keys (the others are
    computed but never attended): the oracle of a reduction that keeps every row at its own position. Output."""
    calls = [0]
    fused = F.scaled_dot_product_attention

    def attend(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        block, calls[0] = calls[0], calls[0] + 1
        rows = next((rows for start, rows in reversed(kept) if block >= start), None)
        if rows is not None:
            hidden = torch.ones(k.shape[-2], dtype=torch.bool)
            hidden[rows] = False
            bias = torch.zeros(1, 1, 1, k.shape[-2], dtype=q.dtype).masked_fill(hidden, float("-inf"))
            attn_mask = bias if attn_mask is None else attn_mask + bias
        return fused(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)

    F.scaled_dot_product_attention = attend
    try:
        with torch.no_grad():
            return model(image)
    finally:
        F.scaled_dot_product_attention = fused
