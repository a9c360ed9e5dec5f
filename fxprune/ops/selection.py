"""Token selection by score (EViT, Top-K)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def evit_kept_tokens(candidates: int, keep_rate: float) -> int:
    """Tokens EViT keeps out of ``candidates`` non-prefix tokens: ``ceil(keep_rate · candidates)``."""
    return min(candidates, math.ceil(keep_rate * candidates))


def gather_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` ``[B, K]`` of ``tokens`` ``[B, N, C]``: ``[B, K, C]``."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def evit_select(x: Tensor, scores: Tensor, keep_rate: float, num_prefix: int, fuse: bool) -> Tensor:
    """EViT token selection: ``[B, N, C]`` → ``[B, P + K (+1), C]``.

    Keeps the ``num_prefix`` prefix tokens, then the ``K = ceil(keep_rate · (N − P))`` tokens with the
    largest ``scores`` ``[B, N]`` (class attention, sorted by score), then, with ``fuse``, one token
    ``Σ_{j dropped} score_j · x_j`` (raw weights). Returns ``x`` itself when no token is dropped.
    """
    prefix, tokens = x[:, :num_prefix], x[:, num_prefix:]
    keep = evit_kept_tokens(tokens.shape[1], keep_rate)
    if keep == tokens.shape[1]:
        return x
    token_scores = scores[:, num_prefix:]
    index = token_scores.topk(keep, dim=1, largest=True, sorted=True).indices
    parts = [prefix, gather_tokens(tokens, index)]
    if fuse:
        dropped = token_scores.scatter(1, index, 0.0).to(x.dtype)
        parts.append(torch.bmm(dropped.unsqueeze(1), tokens))
    return torch.cat(parts, dim=1)
