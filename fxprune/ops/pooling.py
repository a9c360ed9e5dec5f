"""Pooling over reduced tokens."""

from __future__ import annotations

from torch import Tensor

from .registry import graph_op


@graph_op()
def size_weighted_mean(x: Tensor, size: Tensor, keepdim: bool = False) -> Tensor:
    """The mean of ``x`` ``[B, N, C]`` over its rows, each row weighted by the patches it stands for (``size``
    ``[B, N, 1]``; padding has size 0 and is left out): ``[B, C]`` (``[B, 1, C]`` with ``keepdim``). With every
    size 1 it is ``x.mean(1)``; after merging it is the mean of the patches the rows stand for."""
    weights = size.to(x.dtype)
    return (x * weights).sum(dim=1, keepdim=keepdim) / weights.sum(dim=1, keepdim=keepdim)
