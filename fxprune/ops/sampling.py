"""Adaptive token sampling (ATS): significance scores and deterministic inverse-transform sampling.

The rules are the official code's (``ats_block.py``): every ATS block places ``N_ref − P`` evenly spaced
points on the inverse CDF of the sorted significances, ``N_ref`` the tokens entering the *model*; each
point takes the token whose CDF value is nearest and repeats collapse. A cap keeps the most significant
of the distinct picks. In a padded batch (an earlier ATS block kept fewer tokens for some images) every
statistic is computed over each image's own tokens: a token of size 0 is padding and is never scored,
counted or picked, so each image gets exactly what it gets alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ordering import count_below, stable_argsort
from .registry import POSITIONS, ROWS, follows, graph_op
from .scoring import mask_4d
from .selection import after_prefix, gather_tokens

# an ATS cap: a token count (prefix tokens included), a ratio of the incoming tokens, or None (no cap)
Cap = int | float | None
MIN_RATIO_TOKENS = 8  # the official code keeps at least 8 tokens when its cap is a ratio


def ats_budget(tokens: int, cap: Cap) -> int:
    """Most tokens (prefix included) an ATS block with ``cap`` keeps of ``tokens``: all of them without a cap,
    ``min(cap, N)`` for a count, ``round(cap · N)`` clamped to ``[8, N]`` for a ratio (as the official code)."""
    if cap is None:
        return tokens
    if isinstance(cap, float):
        return min(tokens, max(MIN_RATIO_TOKENS, round(cap * tokens)))
    return min(cap, tokens)


def ats_budgets(tokens: Tensor, cap: Cap) -> Tensor:
    """:func:`ats_budget` for each image's own token count ``tokens`` ``[B]``: ``[B]``."""
    if cap is None:
        return tokens
    if isinstance(cap, float):
        ratio = (tokens.to(torch.float64) * cap).round().to(tokens.dtype)
        return torch.minimum(tokens, ratio.clamp(min=MIN_RATIO_TOKENS))
    return tokens.clamp(max=cap)


def real_tokens(size: Tensor | None, batch: int, tokens: int, device: torch.device) -> Tensor:
    """Which of the ``tokens`` rows of each image are its own ``[B, N]``: those of non-zero ``size``
    ``[B, N, 1]`` (padding has size 0); every row when there are no sizes."""
    if size is None:
        return torch.ones(batch, tokens, dtype=torch.bool, device=device)
    return size[..., 0] > 0


def ats_significance(class_row: Tensor, v: Tensor, num_prefix: int, real: Tensor) -> Tensor:
    """ATS significance of the non-prefix tokens ``[B, N − P]``, summing to 1 over each image's own tokens.

    ``S_j ∝ a_j · ‖V_j‖₂`` with ``a_j`` the class token's attention to token ``j`` (``class_row`` ``[B, N]``,
    head-averaged; the head sum of the paper differs by a constant that the normalisation removes) and
    ``V_j`` token ``j``'s values concatenated over heads (``v`` ``[B, H, N, d]``); 0 where ``real`` ``[B, N − P]``
    is False (padding).
    """
    norms = torch.linalg.vector_norm(v.to(class_row.dtype), dim=(1, 3))
    scores = (class_row * norms)[:, num_prefix:].masked_fill(~real, 0.0)
    return scores / scores.sum(dim=1, keepdim=True)


def _nearest(cdf: Tensor, ys: Tensor) -> Tensor:
    """For each of the increasing values ``ys`` ``[B, K]``, the first position of the value of the
    non-decreasing ``cdf`` ``[B, M]`` nearest to it (the lower value on a tie, as the official ``argmin``
    of the distances): ``[B, K]``."""
    above = count_below(cdf, ys).clamp(1, cdf.shape[1] - 1)
    low, high = cdf.gather(1, above - 1), cdf.gather(1, above)
    nearest = torch.where(ys - low <= high - ys, low, high)
    return count_below(cdf, nearest)


def ats_picks(significance: Tensor, points: int, real: Tensor) -> tuple[Tensor, Tensor]:
    """Deterministic inverse-transform sampling of ``points`` points on ``significance`` ``[B, M]``.

    Sorts each image's own scores (``real`` ``[B, M]``) ascending, padding first; the cumulative sum over
    them is min–max normalised; ``points`` evenly spaced values from the smallest non-zero CDF value to 1
    each take the token whose CDF value is nearest; repeats collapse. Returns the tokens in sorted order
    ``[B, M]`` (ascending significance) and whether each sorted position was picked ``[B, M]``.
    """
    masked = significance.masked_fill(~real, -1.0)
    order = stable_argsort(masked)
    scores = masked.gather(1, order)
    cdf = scores.clamp(min=0).cumsum(dim=1)
    first = (~real).sum(dim=1, keepdim=True).clamp(max=cdf.shape[1] - 1)  # sorted position of the first own token
    low, high = cdf.gather(1, first), cdf[:, -1:]
    cdf = (cdf - low) / torch.where(high > low, high - low, torch.ones_like(high))
    padding = torch.arange(cdf.shape[1], device=cdf.device) < first
    cdf = cdf.masked_fill(padding, float("-inf"))
    start = cdf.masked_fill(cdf <= 0, float("inf")).min(dim=1, keepdim=True).values
    start = torch.where(torch.isinf(start), torch.ones_like(start), start)  # one token: every point at 1
    steps = torch.linspace(0, 1, points, dtype=cdf.dtype, device=cdf.device)
    picks = _nearest(cdf, start + (1 - start) * steps) if cdf.shape[1] > 1 else torch.zeros_like(cdf, dtype=torch.long)
    picked = torch.zeros_like(real).scatter(1, picks, 1)  # 1, not True: torch.jit.trace has no bool value
    return order, picked


def _keep_most_significant(picked: Tensor, most: Tensor) -> Tensor:
    """The picks ``[B, M]`` (sorted positions, ascending significance) without all but the ``most`` ``[B]``
    last ones of each image."""
    from_the_end = picked.flip(1).cumsum(dim=1).flip(1)
    return picked & (from_the_end <= most.unsqueeze(1))


def _static_shapes(x: Tensor) -> bool:
    """Whether ``x``'s shapes must not depend on its values (while compiling or propagating fake tensors)."""
    return torch.compiler.is_compiling() or isinstance(x, torch._subclasses.FakeTensor)


@graph_op(padding="size")
def ats_index(
    class_row: Tensor, v: Tensor, cap: Cap, num_prefix: int, ref_tokens: int, size: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The rows ATS keeps ``[B, K]``, prefix rows first, and whether each holds a token ``[B, K]``.

    Places ``ref_tokens − P`` points (:func:`ats_picks`) on the significance of ``class_row`` ``[B, N]`` and
    ``v`` ``[B, H, N, d]`` over each image's own tokens (``size`` ``[B, N, 1]`` of 0 marks padding); of the
    distinct picks each image keeps at most ``ats_budget(its tokens, cap) − P``, the most significant ones,
    in ascending significance. ``K`` is the static ``ats_budget(N, cap)`` when compiling (and for an empty batch),
    else the batch's largest ``P + K'`` (a single image keeps exactly ``P + K'``); padding slots come last.
    """
    batch, tokens = class_row.shape
    real = real_tokens(size, batch, tokens, class_row.device)[:, num_prefix:]
    order, picked = ats_picks(ats_significance(class_row, v, num_prefix, real), ref_tokens - num_prefix, real)
    own = real.sum(dim=1) + num_prefix
    kept = _keep_most_significant(picked, ats_budgets(own, cap) - num_prefix)
    counts = kept.sum(dim=1, keepdim=True)
    if _static_shapes(class_row) or batch == 0:  # an empty batch has no largest count: the static one
        width = min(ats_budget(tokens, cap), ref_tokens) - num_prefix
    else:
        width = int(counts.max())
    positions = stable_argsort((~kept).to(torch.uint8))[:, :width]  # kept positions first, in order
    valid = torch.arange(width, device=class_row.device) < counts
    index = order.gather(1, positions).masked_fill(~valid, 0)
    return after_prefix(index, num_prefix), torch.cat([valid.new_ones(batch, num_prefix), valid], dim=1)


@graph_op()
def gather_queries(q: Tensor, index: Tensor) -> Tensor:
    """The query rows ``index`` ``[B, K]`` of ``q`` ``[B, H, N, d]``: ``[B, H, K, d]``."""
    return gather_tokens(q.transpose(1, 2), index).transpose(1, 2)


@graph_op()
def gather_mask_rows(mask: Tensor, index: Tensor) -> Tensor:
    """The query rows ``index`` ``[B, K]`` of an attention mask ``[…, N, M]`` whose rows differ per query (a
    relative position bias; its leading dimensions broadcast to ``[B, H]``, ``H`` possibly 1): ``[B, H, K, M]``."""
    mask = mask_4d(mask)
    mask = mask.expand(index.shape[0], *mask.shape[1:])
    rows = index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3])
    return mask.gather(2, rows)


@graph_op(stream=True, sized=True)
def ats_pad(x: Tensor, size: Tensor | None, index: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Zero the padding rows of the kept tokens ``x`` ``[B, K, C]`` and give them size 0; other rows keep
    the ``size`` ``[B, N, 1]`` (None: all ones) of the token they came from. Returns (tokens, sizes)."""
    keep = valid.unsqueeze(-1).to(x.dtype)
    sizes = keep if size is None else gather_tokens(size, index) * keep
    return x * keep, sizes


@follows(ats_pad, ROWS)
def ats_pad_rows(x: Tensor, size: Tensor | None, index: Tensor, valid: Tensor) -> Tensor:
    """Where :func:`ats_pad` sends each row of ``x`` ``[B, K, C]``: a kept token stays in its row, a padding slot
    holds no token (−1): ``[B, K]``."""
    slot = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    return torch.where(valid, slot, -1)


@follows(ats_pad, POSITIONS)
def ats_pad_positions(positions: Tensor, size: Tensor | None, index: Tensor, valid: Tensor) -> Tensor:
    """The positions ``[B, K, 1]`` of the rows :func:`ats_pad` gives, from those of the block's input ``[B, N, 1]``
    (the rows ``index`` ``[B, K]`` were kept): a kept token keeps its position, padding gets −1."""
    return gather_tokens(positions, index).masked_fill(~valid.unsqueeze(-1), -1)
