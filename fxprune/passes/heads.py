"""Where each attention head's channels are in the linear layers around an attention, found by running the
graph's own rearrangements on numbered channels; what computing some heads only needs.

For the layer that makes the queries (keys, values) the numbers are its output channels, carried through the
reshapes and permutations after it as far as a ``[B, H, N, d]`` value that every way to the attention's input
passes; for the output projection, the attention's ``(head, element)`` numbers carried to the projection's
input, which only a rearrangement may reach. Between those values and the attention's output, anything that
computes each head from that head's own inputs (a scale, a norm over the head's channels, a rotary embedding, an
explicit ``softmax(q @ kᵀ) @ v``) may run on fewer heads: that is checked by running those nodes on random inputs
for every head, for some and for none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from ..analysis import Block
from ..ops.gating import mask_at_heads
from .common import attribute, between, computed_from_inputs, reachable

__all__ = [
    "HeadInput", "HeadLayout", "head_layout", "is_linear", "producer", "has_parameters", "linear_parameters",
    "weight_and_bias",
]


@dataclasses.dataclass(frozen=True)
class HeadInput:
    """How q (k, v) is made: by the linear node ``linear``, whose output channel of each head's elements is
    ``channels`` (``[H][d]``), laid out per head ``[B, H, N, d]`` at ``node``."""

    linear: fx.Node
    channels: tuple[tuple[int, ...], ...]
    node: fx.Node


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """``inputs``: a :class:`HeadInput` for each of q, k and v; ``attention``: the nodes from their ``node`` on to
    the attention's output (the attention among them), which compute each head from its own inputs and which
    nothing else reads; ``output``: the output projection's linear node and its input channel of each head's
    elements."""

    inputs: tuple[HeadInput, ...]
    attention: frozenset[fx.Node]
    output: tuple[fx.Node, tuple[tuple[int, ...], ...]]


def is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` applies a linear layer (an ``nn.Linear`` module or ``F.linear``)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Linear)
    return node.op == "call_function" and node.target is nn.functional.linear


def weight_and_bias(node: fx.Node) -> tuple[Any, Any]:
    """The weight and bias arguments of a call of ``F.linear``, or of a product that takes ``(x, weight, bias, …)``
    as it does (None where not given)."""
    return (node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"),
            node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))


def _parameter_targets(gm: fx.GraphModule, node: fx.Node) -> tuple[str | fx.Node, str | fx.Node | None] | None:
    """The weight and bias of the linear layer ``node`` applies, each an attribute path where it is read as stored,
    else the node that computes it from parameters and constants only (BEiT's q, k, v bias joined from its parts);
    None when one is computed from the input, or by a hook of its module."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not all(_stored(module, name) for name in ("weight", "bias") if getattr(module, name) is not None):
            return None
        return f"{node.target}.weight", f"{node.target}.bias" if module.bias is not None else None
    weight, bias = weight_and_bias(node)
    given = [value for value in (weight, bias) if value is not None]
    from_inputs = computed_from_inputs(gm)
    if weight is None or any(not isinstance(value, fx.Node) or value in from_inputs for value in given):
        return None
    return _target(weight), None if bias is None else _target(bias)


def _stored(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s ``name`` is what its call uses, read where it is stored: a parameter or buffer (or one
    computed by a parametrization, ``torch.nn.utils.parametrize``) of a module with no hook around its call (the
    ``weight`` of ``torch.nn.utils.prune`` is a plain attribute that a hook computes at each call)."""
    if module._forward_pre_hooks or module._forward_hooks:
        return False
    return name in module._parameters or name in module._buffers or parametrize.is_parametrized(module, name)


def _target(value: fx.Node) -> str | fx.Node:
    """The attribute path ``value`` reads, or ``value`` itself where it computes."""
    return value.target if value.op == "get_attr" else value


def has_parameters(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the linear layer ``node`` applies reads its weight and bias as stored or computed from parameters
    and constants only (not from the input)."""
    return _parameter_targets(gm, node) is not None


def linear_parameters(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """Nodes of the weight and bias (None: none) of the linear layer ``node`` applies (one of a
    :class:`HeadLayout`): a stored one read at the start of the graph, so that any node may use it; a computed one
    as it is (a node that uses it comes after it)."""
    start = next(n for n in gm.graph.nodes if n.op != "placeholder")

    def read(target: str | fx.Node | None) -> fx.Node | None:
        if not isinstance(target, str):
            return target
        with gm.graph.inserting_before(start):
            return gm.graph.get_attr(target)

    weight, bias = _parameter_targets(gm, node)
    return read(weight), read(bias)


class _Stop(Exception):
    """A node :func:`_evaluate` does not run: a module with buffers or hooks."""


class _PartialRun(fx.Interpreter):
    """Runs single nodes of a graph on the values in ``env`` and the example values of their other inputs (not a
    tensor's: a shape, a dtype); see :func:`_evaluate`."""

    def __init__(self, gm: fx.GraphModule, given: dict[fx.Node, Any]):
        super().__init__(gm, garbage_collect_values=False)
        self.env = dict(given)

    def map_nodes_to_values(self, args: Any, n: fx.Node) -> Any:
        def value(arg: fx.Node) -> Any:
            if arg in self.env:
                return self.env[arg]
            known = arg.meta.get("val")
            if isinstance(known, torch.Tensor) or known is None:
                raise LookupError(arg.name)
            return known

        return fx.node.map_arg(args, value)

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        module = self.fetch_attr(target)
        if isinstance(module, (nn.Identity, nn.Dropout)):
            return args[0]
        if next(module.buffers(), None) is not None or module._forward_hooks or module._forward_pre_hooks:
            raise _Stop(target)
        return module(*args, **kwargs)


def _evaluate(gm: fx.GraphModule, nodes: list[fx.Node], given: dict[fx.Node, Any]) -> dict[fx.Node, Any]:
    """The values of ``nodes`` (in graph order) computed from ``given`` (node → value) and the example values of
    their other inputs, as far as the first node that cannot be computed: one reading a tensor it is not given, a
    module with buffers or hooks (nothing of the model may change or see the values), or one that fails. Dropout
    and ``nn.Identity`` pass their input on; the others run without gradients."""
    run = _PartialRun(gm, given)
    with torch.no_grad():
        for node in nodes:
            if node.op not in ("call_module", "call_function", "call_method"):
                break
            try:
                run.env[node] = run.run_node(node)
            except (_Stop, LookupError, RuntimeError, TypeError, ValueError, IndexError, AssertionError):
                break
    return run.env


def _carry(gm: fx.GraphModule, start: fx.Node, stop: fx.Node, numbers: torch.Tensor) -> torch.Tensor | None:
    """``stop``'s value when ``start`` holds ``numbers`` and the nodes between them run on it (:func:`_evaluate`);
    None where it cannot be computed."""
    result = _evaluate(gm, between(gm, start, stop), {start: numbers}).get(stop)
    return result if isinstance(result, torch.Tensor) else None


def _a_layout(numbers: torch.Tensor, first: torch.Tensor) -> bool:
    """Whether carried ``numbers`` are a rearrangement: equal to ``first`` (their values for one image and token)
    everywhere, whole and distinct."""
    return bool((numbers == first).all() and (first == first.round()).all() and first.unique().numel() == first.numel())


def _per_head(numbers: Any, heads: int) -> tuple[tuple[int, ...], ...] | None:
    """``numbers`` ``[B, H, N, d]`` as ``[H][d]`` ints, when they are a rearrangement (:func:`_a_layout`)."""
    if not isinstance(numbers, torch.Tensor) or numbers.dim() != 4 or numbers.shape[1] != heads:
        return None
    first = numbers[:1, :, :1]
    return _table(first[0, :, 0]) if _a_layout(numbers, first) else None


def producer(gm: fx.GraphModule, node: fx.Node,
             found: Callable[[fx.GraphModule, fx.Node], bool] = is_linear) -> fx.Node | None:
    """The nearest linear layer (``found``: the nearest node it accepts) ``node`` is computed from, through the
    first node each reads (into a list: the first part of a ``cat``, as rotary embeddings join the rows they rotate
    to the others); None: none."""
    while node is not None and not found(gm, node):
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


def _value_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose values ``node`` reads: all but the tensor ``x.type_as(other)`` takes a dtype from."""
    if node.op == "call_method" and node.target == "type_as":
        return [node.args[0]] if isinstance(node.args[0], fx.Node) else []
    return node.all_input_nodes


def _head_input(gm: fx.GraphModule, node: fx.Node, heads: int) -> HeadInput | None:
    """The :class:`HeadInput` of the attention input ``node`` ``[B, H, N, d]``: its nearest linear layer (with its
    weight as stored) and the last value on the way that has that layer's channels laid out per head and that
    every way from the layer to ``node`` passes; None: none."""
    linear = producer(gm, node)
    shape = getattr(linear.meta.get("val"), "shape", None) if linear is not None else None
    if linear is None or not has_parameters(gm, linear) or shape is None or len(shape) != 3:
        return None
    path = between(gm, linear, node)
    carried = _evaluate(gm, path, {linear: torch.arange(shape[2], dtype=torch.float64).expand(*shape)})
    on_path = {linear, *path}
    for candidate in reversed(path):
        channels = _per_head(carried.get(candidate), heads)
        if channels is not None and linear not in reachable(
                [node], lambda n: [value for value in _value_inputs(n) if value in on_path], stop=candidate):
            return HeadInput(linear, channels, candidate)
    return None


def _example(gm: fx.GraphModule, node: fx.Node, generator: torch.Generator) -> torch.Tensor:
    """A value for ``node`` (a tensor): the attribute it reads, else random values of its example's shape, dtype and
    device (zeros for integers). On the meta device (a model made without memory), random values on the CPU
    instead: what is checked with them holds for any values."""
    example = attribute(gm, node) if node.op == "get_attr" else node.meta["val"]
    if node.op == "get_attr" and not (isinstance(example, torch.Tensor) and example.is_meta):
        return example
    if example.dtype == torch.bool:
        value = torch.rand(example.shape, generator=generator) > 0.5
    elif not example.dtype.is_floating_point:
        value = torch.zeros(example.shape, dtype=example.dtype)
    else:
        value = torch.randn(example.shape, generator=generator, dtype=example.dtype)
    return value if example.is_meta else value.to(example.device)


def _apart(gm: fx.GraphModule, inputs: tuple[HeadInput, ...], output: fx.Node, heads: int,
           mask: fx.Node | None) -> frozenset[fx.Node] | None:
    """The nodes from the ``inputs``' per-head values to the attention's ``output`` ``[B, H, N, d]``, when they
    compute each head from that head's inputs alone, for any number of heads, and nothing else reads them but
    ``output``'s users: on random inputs, their result for heads ``1 … H − 1`` (and for none) is those heads of
    their result for every head, where ``mask`` (an SDPA call's mask; None: none) is taken at those heads too
    (:func:`~fxprune.ops.gating.mask_at_heads`). None otherwise."""
    starts = {head_input.node for head_input in inputs}
    inside = {node for start in starts for node in between(gm, start, output)}
    nodes = [node for node in gm.graph.nodes if node in inside]
    if any(user not in inside for node in nodes if node is not output for user in node.users):
        return None
    if not all(isinstance(start.meta.get("val"), torch.Tensor) and start.meta["val"].dim() == 4 for start in starts):
        return None
    generator = torch.Generator().manual_seed(0)
    every = {start: _example(gm, start, generator) for start in starts}
    read = {value for node in nodes for value in node.all_input_nodes if value not in inside and value not in starts}
    others = {value: _example(gm, value, generator) for value in read
              if isinstance(value.meta.get("val"), torch.Tensor)}
    expected = _evaluate(gm, nodes, {**every, **others}).get(output)
    for some in (list(range(1, heads)), []):
        given = {**others, **{start: every[start][:, some] for start in starts}}
        if mask in others:
            at = torch.tensor(some, dtype=torch.long, device=others[mask].device)
            given[mask] = mask_at_heads(others[mask], at, heads)
        result = _evaluate(gm, nodes, given).get(output)
        if not isinstance(expected, torch.Tensor) or not isinstance(result, torch.Tensor) \
                or result.shape != expected[:, some].shape \
                or not torch.allclose(result, expected[:, some], rtol=1e-4, atol=1e-5):
            return None
    return frozenset(nodes)


def head_layout(gm: fx.GraphModule, block: Block) -> HeadLayout | None:
    """The :class:`HeadLayout` of ``block``'s attention (fused or explicit), or None (see the module docstring).
    Reads the example values of the graph's nodes: call it before the block is changed."""
    site = block.attention
    inputs = tuple(_head_input(gm, node, site.num_heads) for node in (site.q, site.k, site.v))
    if any(head_input is None for head_input in inputs):
        return None
    attention = _apart(gm, inputs, site.output, site.num_heads, site.mask if site.kind == "sdpa" else None)
    if attention is None:
        return None
    projection = site.output
    while projection is not None and not is_linear(gm, projection):
        users = _data_users(projection)
        projection = users[0] if len(users) == 1 else None
    shape = getattr(site.output.meta.get("val"), "shape", None)
    if projection is None or not has_parameters(gm, projection) or shape is None or len(shape) != 4:
        return None
    codes = torch.arange(shape[1] * shape[3], dtype=torch.float64).view(1, shape[1], 1, shape[3]).expand(*shape)
    if not _shape_read_only_by(site.output, set(between(gm, site.output, projection.args[0]))):
        return None
    carried = _carry(gm, site.output, projection.args[0], codes)
    if carried is None or carried.dim() != 3 or carried.shape[2] != shape[1] * shape[3]:
        return None
    first = carried[:1, :1]
    if not _a_layout(carried, first):
        return None
    columns = torch.empty(shape[1] * shape[3], dtype=torch.long)
    columns[first[0, 0].long()] = torch.arange(first.numel())
    return HeadLayout(inputs, attention, (projection, _table(columns.view(shape[1], shape[3]))))


def _table(numbers: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """``[H, d]`` whole numbers as nested tuples (a literal of the graph)."""
    return tuple(tuple(int(v) for v in row) for row in numbers.tolist())
