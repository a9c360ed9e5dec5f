"""Lowering: ``torch.compile`` with the whole graph in one piece and a dynamic batch dimension."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from .errors import FxPruneError
from .ops.registry import data_dependent
from .passes.skipping import graphs_of

__all__ = ["lower", "LoweredModule"]


class LoweredModule(nn.Module):
    """A compiled module: marks dimension 0 of every input dynamic (``dynamic_batch``), then calls the compiled
    graph with them (by position or by name, as the module takes them). An input the graph cannot be compiled for
    raises what the module raises in eager mode, where it raises (a transformed model's
    :class:`~fxprune.CapturedShapeError` for an input of another size), not torch's error.

    The wrapped module stays available as ``.module`` (its parameters are this module's parameters).
    """

    def __init__(self, module: nn.Module, compiled: Any, dynamic_batch: bool = True):
        super().__init__()
        self.module = module
        self._compiled = compiled
        self.dynamic_batch = dynamic_batch

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.dynamic_batch:
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, torch.Tensor) and arg.dim() > 0:
                    torch._dynamo.maybe_mark_dynamic(arg, 0)
        try:
            return self._compiled(*args, **kwargs)
        except torch._dynamo.exc.Unsupported:  # e.g. an exception the module raises for these inputs, as compiled
            self.module(*args, **kwargs)
            raise


def lower(
    model: nn.Module,
    *,
    dynamic_batch: bool = True,
    check_inputs: Sequence[torch.Tensor] | None = None,
    atol: float = 1e-4,
    **compile_kwargs: Any,
) -> nn.Module:
    """Compile ``model`` with ``torch.compile(fullgraph=True, **compile_kwargs)``.

    The graph must compile in one piece (a graph break raises). With ``dynamic_batch`` the batch
    dimension is compiled dynamic, so batches of any size ≥ 2 share one compiled graph (batch 1 is
    specialised once by torch). With ``check_inputs`` the compiled outputs are compared with eager
    ones (``atol``) and a mismatch raises :class:`~fxprune.FxPruneError`.
    """
    if compile_kwargs.pop("fullgraph", True) is not True:
        raise FxPruneError("fxprune.lower always compiles with fullgraph=True")
    refuse_data_dependent(model, FxPruneError, "torch.compile(fullgraph=True) cannot compile", "lower")
    compiled = torch.compile(model, fullgraph=True, **compile_kwargs)
    lowered = LoweredModule(model, compiled, dynamic_batch)
    if check_inputs is not None:
        _check(model, lowered, tuple(check_inputs), atol)
    return lowered


def refuse_data_dependent(model: nn.Module, error: type[FxPruneError], cannot: str, then: str) -> None:
    """Raise ``error`` where ``model``'s (evaluation) graph runs ops whose shapes depend on the data, as AdaViT's
    skipping graph does (:func:`~fxprune.ops.registry.data_dependent`), naming the model, the methods that skip and
    those ops, also those of the graphs moved apart from it (:func:`~fxprune.passes.skipping.graphs_of`): ``cannot``
    says what has no program for them, ``then`` what to do with the masked form instead."""
    found = data_dependent(node for part in graphs_of(model) for node in part.graph.nodes) \
        if isinstance(model, fx.GraphModule) else []
    if not found:
        return
    plan = getattr(model, "fxprune_plan", None)
    skipping = [part.describe() for part in plan.policy.policies() if getattr(part, "skip", False)] if plan else []
    what = f"{plan.model_name} with {', '.join(skipping)}" if skipping else "the model"
    raise error(f"{what} skips what each image does not use ({', '.join(found)}), with shapes that depend on the "
                f"data, which {cannot}. Transform with skip=False (the masked form: the same outputs, static shapes) "
                f"and {then} that")


def _check(model: nn.Module, lowered: Any, inputs: tuple, atol: float) -> None:
    with torch.no_grad():
        expected = pytree.tree_leaves(model(*inputs))
        got = pytree.tree_leaves(lowered(*inputs))
    for e, g in zip(expected, got):
        if isinstance(e, torch.Tensor) and not torch.allclose(e, g, atol=atol, rtol=0):
            raise FxPruneError(
                f"compiled output differs from eager by {(e - g).abs().max().item():.3g} (atol {atol}); "
                "ties in top-k scores can flip between backends, otherwise please report it"
            )
