"""Orders and searches that pick the same rows in every backend.

A selection must not depend on where it runs: eager PyTorch, ``torch.compile``, an exported program, ONNX Runtime
or an AOTInductor package. Every order here is the *stable* one (ties by lower index), which is unique, so each
backend that computes it picks the same rows. Eagerly and under ``torch.compile`` it is a stable sort; while
``torch.export`` traces (every export format) it is computed from pairwise comparisons, which every runtime has
(ONNX has no stable sort and no ``searchsorted``): ``O(N²)`` comparisons per row, the same result.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _exporting() -> bool:
    return torch.compiler.is_exporting()


def stable_argsort(values: Tensor, descending: bool = False) -> Tensor:
    """The order ``[…, N]`` that sorts ``values`` ``[…, N]`` along its last axis, ties by lower index."""
    if not _exporting():
        return torch.sort(values, dim=-1, descending=descending, stable=True).indices
    row, column = values[..., :, None], values[..., None, :]  # [..., i, j]
    index = torch.arange(values.shape[-1], device=values.device)
    ahead = (column > row) if descending else (column < row)
    ahead = ahead | ((column == row) & (index[None, :] < index[:, None]))
    rank = ahead.sum(dim=-1)  # where row i goes
    return torch.zeros_like(rank).scatter(-1, rank, index.expand_as(rank))


def count_below(sorted_values: Tensor, values: Tensor) -> Tensor:
    """For each of ``values`` ``[B, K]``, how many of the non-decreasing ``sorted_values`` ``[B, M]`` are smaller:
    its left insertion point (``torch.searchsorted``), ``[B, K]``."""
    if not _exporting():
        return torch.searchsorted(sorted_values, values)
    return (sorted_values[:, None, :] < values[:, :, None]).sum(dim=-1)
