"""Where each attention head's channels are in the linear layers around an attention, found by running the
graph's own rearrangements on numbered channels; what computing some heads only needs.

For the layer that makes the queries (keys, values) the numbers are its output channels, carried through the
reshapes and permutations between it and the attention's ``[B, H, N, d]`` input; for the output projection,
the attention's ``(head, element)`` numbers carried to the projection's input. Anything between them that is
not a pure rearrangement (a norm, a scale, a rotary embedding) changes the numbers, and then there is no layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..analysis import Block
from .common import between, reachable

__all__ = ["HeadLayout", "head_layout", "is_linear", "producer", "has_parameters", "linear_parameters"]


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """``inputs``: for q, k and v, the linear node that makes it and its output channel of each head's elements
    (``[H][d]``); ``output``: the output projection's linear node and its input channel of each head's elements."""

    inputs: tuple[tuple[fx.Node, tuple[tuple[int, ...], ...]], ...]
    output: tuple[fx.Node, tuple[tuple[int, ...], ...]]


def is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` applies a linear layer (an ``nn.Linear`` module or ``F.linear``)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Linear)
    return node.op == "call_function" and node.target is nn.functional.linear


def _parameter_targets(gm: fx.GraphModule, node: fx.Node) -> tuple[str, str | None] | None:
    """The attribute paths of the weight and bias of the linear layer ``node`` applies, or None when they are
    computed (e.g. a slice of a joint in-projection)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return f"{node.target}.weight", f"{node.target}.bias" if module.bias is not None else None
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr"):
        return None
    return weight.target, None if bias is None else bias.target


def has_parameters(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the linear layer ``node`` applies reads its weight and bias as they are stored (not computed)."""
    return _parameter_targets(gm, node) is not None


def linear_parameters(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """Nodes of the weight and bias (None: none) of the linear layer ``node`` applies (one of a
    :class:`HeadLayout`), read at the start of the graph so that any node may use them."""
    weight, bias = _parameter_targets(gm, node)
    start = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(start):
        return gm.graph.get_attr(weight), None if bias is None else gm.graph.get_attr(bias)


def _carry(gm: fx.GraphModule, start: fx.Node, stop: fx.Node, numbers: torch.Tensor) -> torch.Tensor | None:
    """``stop``'s value when ``start`` holds ``numbers`` and the nodes between them run on it; None when one reads
    another tensor or is a module other than a no-op."""
    env: dict[fx.Node, Any] = {start: numbers}

    def value(arg: fx.Node) -> Any:
        if arg in env:
            return env[arg]
        known = arg.meta.get("val")
        if isinstance(known, torch.Tensor) or known is None:
            raise LookupError(arg.name)
        return known

    try:
        for node in between(gm, start, stop):
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
            if node.op == "call_module":
                if not isinstance(gm.get_submodule(node.target), (nn.Identity, nn.Dropout)):
                    return None
                env[node] = args[0]
            elif node.op == "call_function":
                env[node] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                return None
    except (LookupError, RuntimeError, TypeError):
        return None
    result = env.get(stop)
    return result if isinstance(result, torch.Tensor) else None


def _a_layout(numbers: torch.Tensor, first: torch.Tensor) -> bool:
    """Whether carried ``numbers`` are a rearrangement: equal to ``first`` (their values for one image and token)
    everywhere, whole and distinct."""
    return bool((numbers == first).all() and (first == first.round()).all() and first.unique().numel() == first.numel())


def _per_head(numbers: torch.Tensor | None, heads: int) -> tuple[tuple[int, ...], ...] | None:
    """``numbers`` ``[B, H, N, d]`` as ``[H][d]`` ints, when they are a rearrangement (:func:`_a_layout`)."""
    if numbers is None or numbers.dim() != 4 or numbers.shape[1] != heads:
        return None
    first = numbers[:1, :, :1]
    return _table(first[0, :, 0]) if _a_layout(numbers, first) else None


def producer(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The nearest linear layer ``node`` is computed from, through the first node each reads (into a list: the
    first part of a ``cat``, as rotary embeddings join the rows they rotate to the others); None: none."""
    while node is not None and not is_linear(gm, node):
        node = next(iter(node.all_input_nodes), None)
    return node


def _reads_values(user: fx.Node) -> bool:
    """Whether ``user`` reads its inputs' values, not only a shape (``x.shape``, ``x.size()``: an example value that is
    not a tensor); one with no example value is taken to."""
    return "val" not in user.meta or isinstance(user.meta["val"], torch.Tensor)


def _data_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values, not only its shape."""
    return [user for user in node.users if _reads_values(user)]


def _shape_read_only_by(node: fx.Node, chain: set[fx.Node]) -> bool:
    """Whether what is computed from ``node``'s shape (its users that read only that, and the shape values made from
    them) is read by the nodes of ``chain`` only: after the attention computes fewer heads, its shape says so, which
    only the rearrangement ``chain`` that the sliced projection replaces may see."""
    reads = reachable([user for user in node.users if not _reads_values(user)],
                      lambda read: [user for user in read.users if not _reads_values(user)])
    return all(user in reads or user in chain for read in reads for user in read.users)


def head_layout(gm: fx.GraphModule, block: Block) -> HeadLayout | None:
    """The :class:`HeadLayout` of ``block``'s SDPA attention, or None (see the module docstring)."""
    site = block.attention
    if site.kind != "sdpa":
        return None
    inputs = []
    for node in (site.q, site.k, site.v):
        linear = producer(gm, node)
        shape = getattr(linear.meta.get("val"), "shape", None) if linear is not None else None
        if linear is not None and not has_parameters(gm, linear):
            return None
        if shape is None or len(shape) != 3:
            return None
        numbers = torch.arange(shape[2], dtype=torch.float64).expand(*shape)
        channels = _per_head(_carry(gm, linear, node, numbers), site.num_heads)
        if channels is None:
            return None
        inputs.append((linear, channels))
    projection = site.node
    while projection is not None and not is_linear(gm, projection):
        users = _data_users(projection)
        projection = users[0] if len(users) == 1 else None
    shape = getattr(site.node.meta.get("val"), "shape", None)
    if projection is None or not has_parameters(gm, projection) or shape is None or len(shape) != 4:
        return None
    codes = torch.arange(shape[1] * shape[3], dtype=torch.float64).view(1, shape[1], 1, shape[3]).expand(*shape)
    if not _shape_read_only_by(site.node, set(between(gm, site.node, projection.args[0]))):
        return None
    carried = _carry(gm, site.node, projection.args[0], codes)
    if carried is None or carried.dim() != 3 or carried.shape[2] != shape[1] * shape[3]:
        return None
    first = carried[:1, :1]
    if not _a_layout(carried, first):
        return None
    columns = torch.empty(shape[1] * shape[3], dtype=torch.long)
    columns[first[0, 0].long()] = torch.arange(first.numel())
    return HeadLayout(tuple(inputs), (projection, _table(columns.view(shape[1], shape[3]))))


def _table(numbers: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """``[H, d]`` whole numbers as nested tuples (a literal of the graph)."""
    return tuple(tuple(int(v) for v in row) for row in numbers.tolist())
