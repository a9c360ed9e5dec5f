"""Adaptive token sampling (ATS): significance scores and deterministic inverse-transform sampling."""

from __future__ import annotations

import torch
from torch import Tensor

from .selection import gather_tokens


def ats_significance(class_row: Tensor, v: Tensor, num_prefix: int) -> Tensor:
    """ATS significance of the non-prefix tokens ``[B, N − P]``, summing to 1 per image.

    ``S_j ∝ a_j · ‖V_j‖₂`` with ``a_j`` the class token's attention to token ``j`` (``class_row`` ``[B, N]``,
    head-averaged; the head sum of the paper differs by a constant that the normalisation removes) and
    ``V_j`` token ``j``'s values concatenated over heads (``v`` ``[B, H, N, d]``).
    """
    norms = v.to(class_row.dtype).pow(2).sum(dim=(1, 3)).sqrt()
    scores = (class_row * norms)[:, num_prefix:]
    return scores / scores.sum(dim=1, keepdim=True)


def _unique_sorted(positions: Tensor, sentinel: int) -> Tensor:
    """Sort each row of ``positions`` ``[B, K]``, replace repeats by ``sentinel`` and move them to the end."""
    ordered = positions.sort(dim=1).values
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, :-1] = ordered[:, 1:] == ordered[:, :-1]
    return ordered.masked_fill(repeat, sentinel).sort(dim=1).values


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
    nearest = (ys.unsqueeze(-1) - cdf.unsqueeze(1)).abs().argmin(dim=-1)
    unique = _unique_sorted(nearest, sentinel=significance.shape[1])
    valid = unique < significance.shape[1]
    index = order.gather(1, unique.clamp(max=significance.shape[1] - 1)).masked_fill(~valid, 0)
    return index, valid


def _static_shapes(x: Tensor) -> bool:
    """Whether ``x``'s shapes must not depend on its values (while compiling or propagating fake tensors)."""
    return torch.compiler.is_compiling() or isinstance(x, torch._subclasses.FakeTensor)


def ats_select(
    x: Tensor, size: Tensor | None, class_row: Tensor, v: Tensor, max_tokens: int, num_prefix: int
) -> tuple[Tensor, Tensor]:
    """ATS in one block: keep the prefix tokens and the tokens sampled from ``x`` ``[B, N, C]``.

    Samples ``max_tokens − P`` points (:func:`ats_sample`) from the significance of ``class_row`` and
    ``v``; each image keeps ``K' ≤ max_tokens − P`` distinct tokens. The result is padded to a common
    length with zero rows of size 0 (so later attention masks them): ``max_tokens`` when compiling,
    else the batch's largest ``P + K'`` (a single image keeps exactly ``P + K'``). ``size`` ``[B, N, 1]``
    (None: all ones) is gathered alongside. Returns the tokens and their sizes.
    """
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    if max_tokens >= x.shape[1]:
        return x, size
    significance = ats_significance(class_row, v, num_prefix)
    index, valid = ats_sample(significance, max_tokens - num_prefix)
    if not _static_shapes(x):
        used = int(valid.sum(dim=1).max())
        index, valid = index[:, :used], valid[:, :used]
    keep = valid.unsqueeze(-1).to(x.dtype)
    tokens = gather_tokens(x[:, num_prefix:], index) * keep
    sizes = gather_tokens(size[:, num_prefix:], index) * keep
    return torch.cat([x[:, :num_prefix], tokens], dim=1), torch.cat([size[:, :num_prefix], sizes], dim=1)
