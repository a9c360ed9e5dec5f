"""Learned token pruning (DynamicViT): keep decisions from a predictor's scores, and attention that ignores the
tokens a training graph has dropped without removing them.

The rules are the official code's (``models/dyvit.py``): at evaluation each pruning stage keeps a fixed number of
patch tokens, those with the largest keep score; in training the decisions are hard Gumbel-softmax samples
multiplied by the previous stage's, and every attention from the first stage on renormalises over the kept keys
(``softmax_with_policy``), each token still attending to itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .ordering import stable_argsort
from .registry import graph_op
from .scoring import match_heads, with_attn_mask
from .selection import after_prefix


@graph_op(padding="size")
def keep_rows(scores: Tensor, keep: int, num_prefix: int, size: Tensor | None = None) -> Tensor:
    """Rows kept at an evaluation stage: the prefix rows, then the ``keep`` patch tokens (all, if fewer) with the
    largest keep score ``scores[..., 0]`` (``scores`` ``[B, N − P, 2]``, log-probabilities), largest first:
    ``[B, P + min(keep, N − P)]``. With ``size`` ``[B, N, 1]`` (a padded batch: padding has size 0 and comes last)
    each image keeps ``min(keep, its own tokens)`` of its own tokens and its remaining slots take its padding."""
    width = min(keep, scores.shape[1])
    keep_score = scores[..., 0]
    if size is None:
        return after_prefix(stable_argsort(keep_score, descending=True)[:, :width], num_prefix)
    real = size[:, num_prefix:, 0] > 0
    top = stable_argsort(keep_score.masked_fill(~real, float("-inf")), descending=True)[:, :width]
    own = real.sum(dim=1, keepdim=True)
    kept = own.clamp(max=keep)
    slot = torch.arange(width, device=scores.device)
    return after_prefix(torch.where(slot < kept, top, own + slot - kept), num_prefix)


@graph_op()
def gumbel_keep(scores: Tensor, previous: Tensor) -> Tensor:
    """Training decisions ``[B, N − P, 1]``: a hard Gumbel-softmax sample (τ = 1, straight-through) of the keep
    channel of ``scores`` ``[B, N − P, 2]``, times the previous stage's decisions ``previous`` ``[B, N − P, 1]``."""
    return F.gumbel_softmax(scores, hard=True)[..., 0:1] * previous


@graph_op()
def with_prefix(decisions: Tensor, num_prefix: int) -> Tensor:
    """The keep policy of every row ``[B, N, 1]``: 1 for the prefix rows, then the patch decisions ``[B, N − P, 1]``."""
    prefix = decisions.new_ones(decisions.shape[0], num_prefix, 1)
    return torch.cat([prefix, decisions], dim=1)


@graph_op()
def softmax_with_policy(logits: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """Attention probabilities ``[B, H, Nq, N]`` over the kept keys: ``(exp(a_ij − max_j)·G_ij + ε/N) /
    (Σ_k exp(a_ik − max_k)·G_ik + ε)`` with ``G_ij = D_j + (1 − D_j)·δ_ij`` (a dropped token still attends to
    itself), ``D`` the keep policy ``[B, N, 1]``; queries that are not the tokens (an attention pool's, ``Nq ≠ N``)
    attend to the kept keys only, ``G_ij = D_j``. Computed in float32, returned in ``logits``' dtype."""
    batch, tokens = policy.shape[0], policy.shape[1]
    keys = policy.reshape(batch, 1, 1, tokens)
    gate = keys
    if logits.shape[-2] == tokens:
        eye = torch.eye(tokens, dtype=keys.dtype, device=keys.device).view(1, 1, tokens, tokens)
        gate = keys + (1.0 - keys) * eye
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    weights = shifted.to(torch.float32).exp() * gate.to(torch.float32)
    return ((weights + eps / tokens) / (weights.sum(dim=-1, keepdim=True) + eps)).to(logits.dtype)


@graph_op(reads_mask=True)
def policy_attention(
    q: Tensor, k: Tensor, v: Tensor, policy: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
    scale: float | None = None,
) -> Tensor:
    """The SDPA call it replaces, ``[B, H, N, dv]``, with :func:`softmax_with_policy` over the keep policy
    ``policy`` ``[B, N, 1]`` in place of the softmax (explicit, so that its gradients stay finite)."""
    k, v = match_heads(k, q.shape[1]), match_heads(v, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q @ k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        logits = with_attn_mask(logits, attn_mask)
    probs = F.dropout(softmax_with_policy(logits, policy), p=dropout_p, training=dropout_p > 0)
    return probs @ v
