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
