"""Token scores computed beside attention: the class token's attention row, or, in a model without a class token,
the attention each token receives (averaged over the queries of its image and over heads)."""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import graph_op


def match_heads(kv: Tensor, heads: int) -> Tensor:
    """Keys or values ``[B, Hkv, N, d]`` repeated to ``heads`` heads (grouped-query attention): ``[B, heads, N, d]``."""
    return kv if kv.shape[1] == heads else kv.repeat_interleave(heads // kv.shape[1], dim=1)


def with_attn_mask(logits: Tensor, attn_mask: Tensor) -> Tensor:
    """``logits`` with an SDPA-style ``attn_mask`` applied: boolean (False → −inf) or added (in ``logits``' dtype)."""
    if attn_mask.dtype == torch.bool:
        return logits.masked_fill(~attn_mask, float("-inf"))
    return logits + attn_mask.to(logits.dtype)


def mask_4d(attn_mask: Tensor) -> Tensor:
    """An SDPA-style ``attn_mask`` of 2 to 4 dimensions as ``[B | 1, H | 1, N, M]`` (leading dimensions of 1 added)."""
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@graph_op(reads_mask=True)
def class_attention(q: Tensor, k: Tensor, scale: float | None = None, attn_mask: Tensor | None = None) -> Tensor:
    """Attention of the class token (query 0) over every key, averaged over heads.

    Computes ``mean_h softmax(q[:, h, 0] · k[:, h]ᵀ · scale + mask[0])`` from the same ``q`` ``[B, H, N, d]``,
    ``k`` ``[B, Hkv, N, d]``, scale and mask as the SDPA call it sits beside, in O(B·H·N·d) instead of
    materialising the ``[B, H, N, N]`` map. The logits are computed in the inputs' dtype (as the SDPA
    kernels do), the softmax in at least float32. Returns ``[B, N]`` in at least float32.
    """
    k = match_heads(k, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = _score_dtype(q.dtype)
    logits = ((q[:, :, :1] * scale) @ k.transpose(-2, -1)).to(dtype)
    if attn_mask is not None:
        row = attn_mask[..., :1, :] if attn_mask.shape[-2] > 1 else attn_mask
        logits = with_attn_mask(logits, row)
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


@graph_op()
def class_attention_from_probs(probs: Tensor) -> Tensor:
    """Class-token row of an explicit attention map ``[B, H, N, N]``, averaged over heads: ``[B, N]``."""
    return probs[:, :, 0].to(_score_dtype(probs.dtype)).mean(dim=1)


def _real_rows(attn_mask: Tensor) -> Tensor:
    """Which rows of a padded batch are real (not padding), from an SDPA-style ``attn_mask`` ``[B|1, H|1, Nq|1,
    N]`` that masks padding as keys: a row is real when it may be attended (by itself, for a per-query mask).
    Returns ``[B|1, N]`` booleans."""
    allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
    rows = allowed[..., 0, :] if allowed.shape[-2] == 1 else allowed.diagonal(dim1=-2, dim2=-1)
    return rows.any(dim=1) if rows.dim() == 3 else rows


@graph_op(reads_mask=True)
def received_attention(
    q: Tensor, k: Tensor, scale: float | None = None, attn_mask: Tensor | None = None, chunk: int = 128
) -> Tensor:
    """Attention each token receives, averaged over the real queries of its image and over heads: the class-free
    token score, ``mean_{h, i real} softmax(q[:, h, i] · k[:, h]ᵀ · scale + mask[i])[j]``.

    From the same ``q`` ``[B, H, N, d]``, ``k`` ``[B, Hkv, N, d]``, scale and mask as the SDPA call it sits beside,
    ``chunk`` queries at a time (never the ``[B, H, N, N]`` map). Padding (rows the mask hides as keys) neither
    receives attention nor counts as a query. Logits in the inputs' dtype, softmax in at least float32; returns
    ``[B, N]`` in at least float32, each image's scores summing to 1.
    """
    k = match_heads(k, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = _score_dtype(q.dtype)
    real = None if attn_mask is None else _real_rows(attn_mask).to(dtype).expand(q.shape[0], q.shape[2])
    total = q.new_zeros(q.shape[0], k.shape[2], dtype=dtype)
    for start in range(0, q.shape[2], chunk):
        logits = ((q[:, :, start:start + chunk] * scale) @ k.transpose(-2, -1)).to(dtype)
        if attn_mask is not None:
            rows = attn_mask[..., start:start + chunk, :] if attn_mask.shape[-2] > 1 else attn_mask
            logits = with_attn_mask(logits, rows)
        probs = logits.softmax(dim=-1).sum(dim=1)
        if real is not None:
            probs = probs * real[:, start:start + chunk, None]
        total = total + probs.sum(dim=1)
    queries = q.shape[2] if real is None else real.sum(dim=1, keepdim=True)
    return total / (queries * q.shape[1])


@graph_op()
def received_attention_from_probs(probs: Tensor) -> Tensor:
    """Attention each token receives in an explicit attention map ``[B, H, N, N]``, averaged over heads and over
    the real queries (padding, which no query attends, left out): ``[B, N]``."""
    probs = probs.to(_score_dtype(probs.dtype))
    received = probs.sum(dim=2).mean(dim=1)
    real = (received > 0).to(probs.dtype)
    total = (probs.mean(dim=1) * real[:, :, None]).sum(dim=1)
    return total / real.sum(dim=1, keepdim=True)
