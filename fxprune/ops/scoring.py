"""Token scores computed beside attention."""

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
