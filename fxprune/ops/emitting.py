"""Auxiliary values out of a running graph: :func:`emit`, the one graph op with an effect, hands a value to the
innermost :func:`collect` context (a loss's keep ratios, decisions), without changing the model's outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.fx as fx
from torch import Tensor

from .registry import graph_op

__all__ = ["emit", "collect", "collecting"]

_COLLECTORS: list[dict[str, list[Tensor]]] = []


@graph_op()
def emit(value: Tensor, key: str, like: Tensor | None = None) -> Tensor:
    """Hand ``value`` to the innermost :func:`collect` context under ``key`` (nothing happens outside one), in the
    dtype of ``like`` where given (e.g. boolean decisions collected as 0/1); returns ``value``. The graph keeps the
    call even though nothing reads its result."""
    if _COLLECTORS:
        _COLLECTORS[-1].setdefault(key, []).append(value if like is None else value.to(like.dtype))
    return value


fx.node._side_effectful_functions.add(emit)


def collecting() -> bool:
    """Whether a :func:`collect` context is open (a graph's emitted values are being collected)."""
    return bool(_COLLECTORS)


@contextlib.contextmanager
def collect() -> Iterator[dict[str, list[Tensor]]]:
    """Collect the auxiliary values a learned graph emits while the ``with`` body runs it: key → values, in the
    order they were emitted (one per call of the model)::

        with fxprune.collect() as aux:
            logits = model(images)
        loss = criterion(logits, labels) + penalty(aux["blocks.3/keep"])
    """
    values: dict[str, list[Tensor]] = {}
    _COLLECTORS.append(values)
    try:
        yield values
    finally:
        _COLLECTORS.remove(values)
