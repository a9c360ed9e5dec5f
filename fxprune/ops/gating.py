"""Learned usage gates (AdaViT): per-image decisions to use a block's heads, sub-layers and patch tokens, and the
masks that apply them.

The rules are the official code's (``MengLcool/AdaViT``, ``models/ada_transformer_block.py``): a decision is a
hard Gumbel-sigmoid sample in training (τ = 5, straight-through) and ``sigmoid(logit) > threshold`` at evaluation;
a head not used has its q, k, v and output channels zeroed; a token not used is no key for the others, attends
only to itself, and gets no update from the block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import graph_op


@graph_op()
def gumbel_gate(logits: Tensor, threshold: float, tau: float = 5.0) -> Tensor:
    """Training decisions, the shape of ``logits``: ``1[sigmoid((logits + g₁ − g₂) / τ) > threshold]`` with
    ``g₁, g₂`` Gumbel noise, straight-through (the gradient of ``sigmoid((logits + g₁ − g₂) / τ)``)."""
    noise = -torch.empty_like(logits).exponential_().log() + torch.empty_like(logits).exponential_().log()
    soft = torch.sigmoid((logits + noise) / tau)
    hard = (soft > threshold).to(soft.dtype)
    return hard - soft.detach() + soft


@graph_op()
def threshold_gate(logits: Tensor, threshold: float) -> Tensor:
    """Evaluation decisions, the shape of ``logits``: ``1[sigmoid(logits) > threshold]`` (no noise, no τ)."""
    return (torch.sigmoid(logits) > threshold).to(logits.dtype)


@graph_op()
def head_gate(heads: Tensor) -> Tensor:
    """Per-head decisions ``[B, H]`` as a factor on ``[B, H, N, d]`` head tensors: ``[B, H, 1, 1]``."""
    return heads[:, :, None, None]


@graph_op()
def channel_gate(heads: Tensor, head_dim: int) -> Tensor:
    """Per-head decisions ``[B, H]`` as a factor on ``[B, N, H·d]`` channels (head ``h`` owns channels
    ``h·d … (h+1)·d − 1``): ``[B, 1, H·d]``."""
    return heads.repeat_interleave(head_dim, dim=1)[:, None, :]


@graph_op()
def token_gate(tokens: Tensor, num_prefix: int) -> Tensor:
    """Per-row decisions ``[B, N, 1]`` from the patch tokens' ``tokens`` ``[B, N − P, 1]``: prefix rows always 1."""
    return torch.cat([tokens.new_ones(tokens.shape[0], num_prefix, 1), tokens], dim=1)


@graph_op()
def usage_mask(rows: Tensor) -> Tensor:
    """The attention mask of per-row decisions ``rows`` ``[B, N, 1]``: ``[B, 1, N, N]``, True where query ``i`` may
    attend to key ``j`` (both used, or ``i = j``: a token not used attends to itself only). No gradient."""
    used = rows.detach()[..., 0] > 0.5
    both = used[:, :, None] & used[:, None, :]
    eye = torch.eye(rows.shape[1], dtype=torch.bool, device=rows.device)
    return (both | eye)[:, None]


@graph_op()
def combine_masks(first: Tensor | None, second: Tensor) -> Tensor:
    """One SDPA mask applying both ``first`` (boolean or additive; None: none) and the boolean ``second``."""
    if first is None:
        return second
    if first.dtype == torch.bool:
        return first & second
    return first.masked_fill(~second, float("-inf"))


@graph_op()
def sublayer_gate(tokens: Tensor, layers: Tensor, which: int) -> Tensor:
    """The factor on a sub-layer's output ``[B, N, C]``: the per-row decisions ``tokens`` ``[B, N, 1]`` times the
    sub-layer's decision ``layers[:, which]`` (``layers`` ``[B, 2]``: attention, MLP): ``[B, N, 1]``."""
    return tokens * layers[:, which, None, None]
