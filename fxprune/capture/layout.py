"""Batch-first tokens: a graph pass that lays a sequence-first token stream out batch first.

OpenAI's CLIP and ``nn.TransformerEncoder`` without ``batch_first`` carry their tokens as ``[N, B, C]``: the model's
code swaps the first two axes of its ``[B, N, C]`` tokens before the blocks and back after them (and each
decomposed ``nn.MultiheadAttention`` swaps them around its attention). Between such swaps every op acts on each
row alone (norms, linear layers, activations, residual sums), so the same graph without the swaps computes the
same values batch first. :func:`batch_first_tokens` removes the swaps around each such region, so that the
analysis sees a ``[B, N, C]`` stream; a region with an op that depends on the layout (a shape read, a reshape, an
index along the first two axes) is left as it is.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .values import propagate

if TYPE_CHECKING:
    from .tracer import TraceInfo

__all__ = ["batch_first_tokens"]

# ops that act on each row alone and read their data from their first argument (the others: weights, options)
_ROW_FUNCTIONS = {F.linear, F.gelu, F.relu, F.silu, F.dropout, torch.sigmoid, torch.tanh, torch.relu}
_ROW_METHODS = {"type", "to", "float", "half", "bfloat16", "double", "contiguous", "clone", "sigmoid", "tanh",
                "relu"}
_ROW_MODULES = (nn.Linear, nn.Dropout, nn.Identity, nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid)
# ops on several operands, element by element
_ELEMENT_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                      torch.div}
_ELEMENT_METHODS = {"add", "sub", "mul", "div"}
_LAYOUT_FREE_READS = {"dtype", "device", "requires_grad", "is_cuda", "is_nested"}  # attributes
_LAYOUT_FREE_CALLS = {"dim", "is_floating_point", "get_device"}  # methods


def _reads_no_layout(node: fx.Node) -> bool:
    """Whether ``node`` reads something of a tensor that does not depend on its layout (its dtype, its rank)."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _LAYOUT_FREE_READS
    return node.op == "call_method" and node.target in _LAYOUT_FREE_CALLS and len(node.args) == 1


def _unused(gm: fx.GraphModule, guarded: set[str]) -> set[fx.Node]:
    """The nodes of ``gm`` that have no effect: pure, read by no guard (``guarded``: their nodes' names), and read by
    nothing, or only by such nodes (a size read left unused by the model's code)."""
    unused: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):  # each node's users before it
        if node.op != "output" and not node.is_impure() and node.name not in guarded \
                and all(user in unused for user in node.users):
            unused.add(node)
    return unused


def _row_index(node: fx.Node) -> int | slice | None:
    """The index of ``node``, ``x[i]`` or ``x[a:b]`` (one int or slice, alone or in a tuple), which indexes the
    rows of a sequence-first ``x``; None for any other node."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    index = node.args[1]
    index = index[0] if isinstance(index, tuple) and len(index) == 1 else index
    return index if isinstance(index, (int, slice)) and not isinstance(index, bool) else None


def _rank(node: object) -> int | None:
    """The rank of the tensor ``node``'s example value (None: not a tensor node)."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else None


def _swapped(node: fx.Node) -> fx.Node | None:
    """The tensor ``[a, b, c]`` whose first two axes ``node`` swaps (``x.transpose(0, 1)``, ``x.permute(1, 0, 2)``),
    or None for any other node."""
    if node.op not in ("call_method", "call_function") or not node.args or _rank(node.args[0]) != 3 or node.kwargs:
        return None
    source, rest = node.args[0], node.args[1:]
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    dims = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else tuple(rest)
    if not all(isinstance(axis, int) for axis in dims):
        return None
    if name in ("transpose", "swapaxes", "swapdims") and len(dims) == 2:
        return source if {axis % 3 for axis in dims} == {0, 1} else None
    if name == "permute":
        return source if tuple(axis % 3 for axis in dims) == (1, 0, 2) else None
    return None


def _per_row(node: fx.Node) -> bool:
    """Whether the tensor ``node`` broadcasts over rows only: every axis but the last of size 1 (a bias ``[C]``)."""
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() <= 3 and all(size == 1 for size in value.shape[:-1])


def _operands(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node] | None:
    """The token operands of ``node`` where it acts on each row alone (None: it may depend on the layout)."""
    first = [node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        row_wise = isinstance(module, _ROW_MODULES) or (
            isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1)
        return first if row_wise and len(node.args) == 1 and not node.kwargs else None
    if node.op == "call_function" and node.target is F.layer_norm:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        return first if isinstance(shape, (tuple, list)) and len(shape) == 1 else None
    if (node.op == "call_function" and node.target in _ROW_FUNCTIONS) or \
            (node.op == "call_method" and node.target in _ROW_METHODS):
        return first
    if (node.op == "call_function" and node.target in _ELEMENT_FUNCTIONS) or \
            (node.op == "call_method" and node.target in _ELEMENT_METHODS):
        return [arg for arg in node.args[:2] if isinstance(arg, fx.Node)]
    return None


def _swaps_behind(gm: fx.GraphModule, node: fx.Node, inside: set[fx.Node]) -> list[fx.Node]:
    """The swaps of tokens from outside ``inside`` that ``node`` is computed from through ops that act on each row
    alone (:func:`_operands`)."""
    swaps, seen, todo = [], {node}, [node]
    while todo:
        value = todo.pop()
        source = _swapped(value)
        if source is not None:
            swaps += [] if source in inside else [value]
            continue
        for operand in _operands(gm, value) or ():
            if operand not in seen:
                seen.add(operand)
                todo.append(operand)
    return swaps


def _region(gm: fx.GraphModule, entry: fx.Node, unused: set[fx.Node]
            ) -> tuple[list[fx.Node], list[fx.Node], list[fx.Node]] | None:
    """The swaps into (``entry`` and those whose results meet its tokens) and out of the sequence-first region
    that ``entry`` starts, and the indexings of its rows (:func:`_row_index`), or None where a value in it is read
    by an op that may depend on the layout (but for one of the nodes ``unused``, :func:`_unused`), or meets a tensor
    laid out otherwise."""
    entries, exits, rows, inside = [entry], [], [], {entry}
    met: list[fx.Node] = []  # the other operands of the ops inside: inside too in the end, or per row
    todo = [entry]
    while todo:
        while todo:
            for user in list(todo.pop().users):
                if user in inside or user in exits:
                    continue
                if _swapped(user) in inside:
                    exits.append(user)
                    continue
                if _reads_no_layout(user) or user in unused:
                    continue
                if user.args[0] in inside and _row_index(user) is not None:  # rows: batch first, x[:, i]
                    rows.append(user)
                    if isinstance(_row_index(user), slice):  # its result is sequence first too
                        inside.add(user)
                        todo.append(user)
                    continue
                operands = _operands(gm, user)
                if operands is None or any(value in inside for value in user.all_input_nodes if value not in operands):
                    return None
                met += operands
                inside.add(user)
                todo.append(user)
        for operand in met:  # swaps of tokens from outside whose results meet the region's: more entries
            for swap in [] if operand in inside else _swaps_behind(gm, operand, inside):
                if swap not in inside:
                    entries.append(swap)
                    inside.add(swap)
                    todo.append(swap)
    if any(_swapped(swap) in inside for swap in entries) or \
            not all(operand in inside or _per_row(operand) for operand in met):
        return None
    return entries, exits, rows


def batch_first_tokens(gm: fx.GraphModule, info: TraceInfo) -> None:
    """Canonicalising pass run by :func:`~fxprune.capture.trace`: remove the swaps of the first two axes around
    every region of ``gm`` that acts on each row alone (:func:`_region`), so that its tokens are ``[B, N, C]``;
    each region is noted in ``info.notes``. When anything changed, ``gm`` is recompiled and its example values
    propagated again."""
    refused: set[fx.Node] = set()
    guarded = {guard.node for guard in info.guards}
    changed = False
    while candidates := [node for node in gm.graph.nodes if node not in refused and _swapped(node) is not None]:
        found, unused = None, _unused(gm, guarded)
        for node in candidates:
            found = _region(gm, node, unused)
            if found is not None:
                break
            refused.add(node)
        if found is None:
            break
        entries, exits, rows = found
        for node in rows:
            node.args = (node.args[0], (slice(None), _row_index(node)))
        swaps = sorted([*entries, *exits], key=list(gm.graph.nodes).index)
        info.notes.append(f"tokens laid out batch first from {swaps[0].name} to {swaps[-1].name}, where the model "
                          "swaps them to sequence first ([N, B, C]) and back: the swaps are removed")
        for swap in swaps:
            swap.replace_all_uses_with(swap.args[0])
            gm.graph.erase_node(swap)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
        propagate(gm)
