"""Adaptive token sampling (ATS): significance scores and deterministic inverse-transform sampling."""

from __future__ import annotations

import torch
from torch import Tensor

from .selection import after_prefix, gather_tokens


def ats_significance(class_row: Tensor, v: Tensor, num_prefix: int) -> Tensor:
    """ATS significance of the non-prefix tokens ``[B, N − P]``, summing to 1 per image.

    ``S_j ∝ a_j · ‖V_j‖₂`` with ``a_j`` the class token's attention to token ``j`` (``class_row`` ``[B, N]``,
    head-averaged; the head sum of the paper differs by a constant that the normalisation removes) and
    ``V_j`` token ``j``'s values concatenated over heads (``v`` ``[B, H, N, d]``).
    """
    norms = torch.linalg.vector_norm(v.to(class_row.dtype), dim=(1, 3))
    scores = (class_row * norms)[:, num_prefix:]
    return scores / scores.sum(dim=1, keepdim=True)


def _unique_sorted(ordered: Tensor, sentinel: int) -> Tensor:
    """Replace repeats in the non-decreasing rows of ``ordered`` ``[B, K]`` by ``sentinel`` and move them to the end."""
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, :-1] = ordered[:, 1:] == ordered[:, :-1]
    return ordered.masked_fill(repeat, sentinel).sort(dim=1).values


def _nearest(cdf: Tensor, ys: Tensor) -> Tensor:
    """For each of the increasing values ``ys`` ``[B, K]``, the position of the nearest value of the
    non-decreasing ``cdf`` ``[B, M]`` (the lower one on a tie): ``[B, K]``, non-decreasing."""
    above = torch.searchsorted(cdf, ys).clamp(1, cdf.shape[1] - 1)
    low, high = cdf.gather(1, above - 1), cdf.gather(1, above)
    return torch.where(ys - low <= high - ys, above - 1, above)


def ats_sample(significance: Tensor, points: int) -> tuple[Tensor, Tensor]:
    """Deterministic inverse-transform sampling of ``points`` tokens from ``significance`` ``[B, M]``.

    Sorts the scores ascending and min–max normalises their cumulative sum; ``points`` evenly spaced
    values from the smallest non-zero CDF value to 1 each take the token whose CDF value is nearest;
    repeats collapse. Returns token indices ``[B, points]`` (in ascending-significance order, unused
    slots last, pointing at token 0) and whether each slot holds a sampled token ``[B, points]``.
    """
    scores, order = significance.sort(dim=1)
    cdf = scores.cumsum(dim=1)
    low, high = cdf.min(dim=1, keepdim=True).values, cdf.max(dim=1, keepdim=True).values
    cdf = (cdf - low) / (high - low)
    start = cdf.masked_fill(cdf == 0, float("inf")).min(dim=1, keepdim=True).values
    steps = torch.linspace(0, 1, points, dtype=cdf.dtype, device=cdf.device)
    ys = start + (1 - start) * steps
    unique = _unique_sorted(_nearest(cdf, ys), sentinel=significance.shape[1])
    valid = unique < significance.shape[1]
    index = order.gather(1, unique.clamp(max=significance.shape[1] - 1)).masked_fill(~valid, 0)
    return index, valid


def _static_shapes(x: Tensor) -> bool:
    """Whether ``x``'s shapes must not depend on its values (while compiling or propagating fake tensors)."""
    return torch.compiler.is_compiling() or isinstance(x, torch._subclasses.FakeTensor)


def ats_index(class_row: Tensor, v: Tensor, max_tokens: int, num_prefix: int) -> tuple[Tensor, Tensor]:
    """The rows ATS keeps ``[B, K]``, prefix rows first, and whether each holds a token ``[B, K]``.

    Samples ``max_tokens − P`` points (:func:`ats_sample`) from the significance of ``class_row`` ``[B, N]``
    and ``v`` ``[B, H, N, d]``; each image keeps ``K' ≤ max_tokens − P`` distinct tokens. ``K`` is
    ``max_tokens`` when compiling, else the batch's largest ``P + K'`` (a single image keeps exactly
    ``P + K'``); every row is kept when ``max_tokens ≥ N``.
    """
    batch, tokens = class_row.shape
    if max_tokens >= tokens:
        rows = torch.arange(tokens, device=class_row.device).expand(batch, tokens)
        return rows, torch.ones_like(rows, dtype=torch.bool)
    index, valid = ats_sample(ats_significance(class_row, v, num_prefix), max_tokens - num_prefix)
    if not _static_shapes(class_row):
        used = int(valid.sum(dim=1).max())
        index, valid = index[:, :used], valid[:, :used]
    return after_prefix(index, num_prefix), torch.cat([valid.new_ones(batch, num_prefix), valid], dim=1)


def gather_queries(q: Tensor, index: Tensor) -> Tensor:
    """The query rows ``index`` ``[B, K]`` of ``q`` ``[B, H, N, d]``: ``[B, H, K, d]``."""
    return gather_tokens(q.transpose(1, 2), index).transpose(1, 2)


def ats_pad(x: Tensor, size: Tensor | None, index: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Zero the padding rows of the kept tokens ``x`` ``[B, K, C]`` and give them size 0; other rows keep
    the ``size`` ``[B, N, 1]`` (None: all ones) of the token they came from. Returns (tokens, sizes)."""
    keep = valid.unsqueeze(-1).to(x.dtype)
    sizes = keep if size is None else gather_tokens(size, index) * keep
    return x * keep, sizes


def ats_select(
    x: Tensor, size: Tensor | None, class_row: Tensor, v: Tensor, max_tokens: int, num_prefix: int
) -> tuple[Tensor, Tensor]:
    """ATS in one block, selecting after the residual add: the rows :func:`ats_index` keeps of ``x``
    ``[B, N, C]``, padding zeroed with size 0 (so later attention masks it). Returns (tokens, sizes)."""
    index, valid = ats_index(class_row, v, max_tokens, num_prefix)
    return ats_pad(gather_tokens(x, index), size, index, valid)
