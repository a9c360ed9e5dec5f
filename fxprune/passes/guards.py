"""Guards at run time: each Python condition or number that capture resolved from the example inputs' shapes
(:class:`~fxprune.capture.Guard`) is checked again on every call of a transformed model. An input for which the
model's code would take another branch or size (another image size for a model that resamples its position
embeddings to the input) then raises :class:`~fxprune.errors.CapturedShapeError`, naming that code, instead of
running a graph that is not the model's program for it. The checks read shapes only; under ``torch.compile`` they
become compile-time guards, with no graph break (a model lowered by :func:`fxprune.lower` called on such an input
raises this error as in eager mode; under a bare ``torch.compile``, dynamo's own error carries its message)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import has_side_effect

from ..analysis import ancestors
from ..capture import TraceInfo
from ..errors import CapturedShapeError
from ..ops.registry import graph_op

__all__ = ["check_guard", "check_rank", "check_guards_at_run"]


@graph_op()
def check_guard(value: Any, expected: bool | int | float, captured: str) -> None:
    """Raise :class:`~fxprune.errors.CapturedShapeError` (``captured`` says what capture resolved, and where) when
    ``value``, a condition or size the model's code computes from its input's shape, is not ``expected``."""
    held = (value if expected else not value) if isinstance(expected, bool) else value == expected
    if not held:  # a condition is tested as such: under torch.compile it may be symbolic, never compared to a bool
        raise CapturedShapeError(
            f"{captured}; for this input it is {type(expected)(value)}, so the transformed graph is not what the model "
            "computes for it. Transform the model again with example_inputs of this input's shape "
            "(fxprune.transform(model, policy, example_inputs=(x,)))."
        )


@graph_op()
def check_rank(x: Any, dims: int, name: str, model: str, captured: str) -> None:
    """Raise :class:`~fxprune.errors.CapturedShapeError` where ``x``, the input ``name`` of ``model`` (captured
    ``captured``), is a tensor of other than ``dims`` dimensions, before the graph reads its shape axis by axis (one
    image without its batch axis would fail there with an ``IndexError``)."""
    if isinstance(x, torch.Tensor) and x.dim() != dims:
        one = f" (one image: {name}[None], a batch of one)" if x.dim() == dims - 1 else ""
        raise CapturedShapeError(
            f"{model} was transformed for {name} of {dims} dimensions ({captured}), and this {name} has {x.dim()}: "
            f"{list(x.shape)}. Pass it as captured{one}, or transform the model again with example_inputs of this "
            "shape"
        )


has_side_effect(check_guard)  # kept by dead-code elimination, which would drop a call whose result is unused
has_side_effect(check_rank)


def check_guards_at_run(gm: fx.GraphModule, trace: TraceInfo) -> None:
    """Make ``gm`` check its inputs' numbers of dimensions first (:func:`check_rank`), and each guard of its capture
    ``trace`` right after its node, where the output is computed from the tensors whose shapes it reads (a guard in
    code whose result nothing reads is left out: checking it would run that code)."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and node.users and all(user.target is not check_rank for user in node.users):
            _check_after(gm, node, check_rank, (node, value.dim(), node.target, trace.model_class,
                                                 f"captured as {list(value.shape)}"))
    live = ancestors(gm.graph.find_nodes(op="output"))
    nodes = {node.name: node for node in gm.graph.nodes}
    when = "when captured on inputs " + ", ".join(str(list(shape)) for shape in trace.example_shapes)
    for guard in trace.guards:
        node = nodes.get(guard.node)
        if node is not None and not _reads_dead_tensors(node, live):
            _check_after(gm, node, check_guard, (node, guard.value, guard.resolved(when)))


def _check_after(gm: fx.GraphModule, node: fx.Node, check: Callable[..., None], args: tuple) -> None:
    """Call the check ``check`` on ``args`` right after ``node``, with its example value (None), as the passes after
    this one read every node's."""
    with gm.graph.inserting_after(node):
        gm.graph.call_function(check, args).meta["val"] = None


def _reads_dead_tensors(node: fx.Node, live: set[fx.Node]) -> bool:
    """Whether ``node`` is computed from a tensor (its example value) that the output is not computed from."""
    todo, seen = [node], set()
    while todo:
        current = todo.pop()
        if current in live or current in seen:
            continue
        seen.add(current)
        if isinstance(current.meta.get("val"), torch.Tensor):
            return True
        todo.extend(current.all_input_nodes)
    return False
