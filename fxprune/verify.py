"""Verify a rewritten graph before handing it out: lint, shapes at two batch sizes, guards, literal token counts.

Any failure means the rewrite would compute wrong numbers (or crash) on this model, so it raises
:class:`~fxprune.UnsupportedModelError` naming the node, its module and why.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .analysis import TokenProgram, module_path
from .capture import ValuePropagationError, propagate
from .errors import FxPruneError, UnsupportedModelError
from .ops import at_positions
from .passes.common import graph_order, reshape_sizes, stream_node, tag_of
from .planning import Plan, token_count
from .readout import data_nodes

__all__ = ["verify", "verify_training"]


def _where(node: fx.Node) -> str:
    return f"node {node.name!r} in {module_path(node) or 'the top-level forward'}"


def _check_batch(gm: fx.GraphModule, values: dict[fx.Node, Any], batch: int) -> None:
    output = gm.graph.find_nodes(op="output")[0]
    result = fx.node.map_arg(output.args[0], lambda n: values.get(n))
    for leaf in pytree.tree_leaves(result):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] != batch:
            raise UnsupportedModelError(f"after the rewrite an output has batch {leaf.shape[0]} for {batch} inputs")


def _check_selections(program: TokenProgram, plan: Plan, values: dict[fx.Node, Any]) -> None:
    """Each block's new stream has exactly the tokens its policy's formula gives for the tokens it receives: its
    input's, or, where a block before it left its new stream after that input (a block with no MLP, whose residual
    sum is the next block's input), that stream's."""
    order, left = graph_order(program.gm), None
    for row in plan.rows:
        entering = program.blocks[row.index].input
        if left is not None and order(left) > order(entering):
            entering = left
        stream = stream_node(program.gm, row.index) if row.policy is not None else None
        if stream is None:
            continue
        got, received = token_count(values[stream]), token_count(values[entering])
        expected = row.policy.tokens_out(received, program.prefix_tokens, row.index)
        if got != expected:
            raise FxPruneError(
                f"internal error: block {row.index} keeps {got} of {received} tokens, {row.policy.describe()} "
                f"should keep {expected}"
            )
        left = stream


def _check_position_terms(gm: fx.GraphModule, program: TokenProgram, values: dict[fx.Node, Any]) -> None:
    """Each position term taken at the rows' positions is laid out for every token of its block (or every patch) on
    the axes it is taken along: the positions index the dense model's tokens, which example values do not bound."""
    for node in gm.graph.nodes:
        if node.target is not at_positions or not isinstance(values.get(node.args[0]), torch.Tensor):
            continue
        term, axes, patches_only, prefix = values[node.args[0]], node.args[2], node.args[3], node.args[4]
        tokens = program.blocks[tag_of(node).block].tokens
        needed = tokens - prefix if patches_only else tokens
        short = [term.shape[axis] for axis in axes if term.shape[axis] != needed]
        if short:
            raise UnsupportedModelError(
                f"after the rewrite the position table {node.args[0].name} ({_where(node.args[0])}) is laid out for "
                f"{short[0]} positions where the dense model has {needed}: it is computed from something the "
                "reduction changes, so the kept rows' positions cannot be taken from it. Reduce tokens only after it."
            )


def _check_guards(gm: fx.GraphModule, program: TokenProgram, values: dict[fx.Node, Any]) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    for guard in program.trace.guards:
        node = nodes.get(guard.node)
        if node is None or node not in values:
            continue
        now = type(guard.value)(values[node])
        if now == guard.value:
            continue
        if isinstance(guard.value, bool):
            raise UnsupportedModelError(
                f"{guard.resolved('at capture')}; after the rewrite it would take the other branch, which the "
                "captured graph does not contain. Reduce tokens in later blocks only, or make that code independent "
                "of the token count."
            )
        raise UnsupportedModelError(
            f"{guard.resolved('at capture')}, which the captured graph holds from there on; after the rewrite, or for "
            f"another batch size, it is {now}. Reduce tokens only after that code, or make it read the size from the "
            "tensor."
        )


def _literals(value: Any, in_slice: bool = False):
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield value, in_slice
    elif isinstance(value, slice):
        for part in (value.start, value.stop, value.step):
            yield from _literals(part, True)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _literals(item, in_slice)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _literals(item, in_slice)


def _sized_apart(node: fx.Node, literal: int, dense: dict[fx.Node, Any], static: bool) -> bool:
    """Whether the ``literal`` that ``node`` (``x.view(*shape)``, ``x.reshape(*shape)``) takes as a size is not the
    token count, though it equals it (a head size of 16 beside 16 tokens): after the rewrite the axes it gives keep
    that size and the axes whose size changed (``dense``: each node's value before the rewrite) all take their size
    from the tensor's shape, not from a literal or ``-1``; or, where the rewrite's token counts are ``static`` (no
    image keeps its own), none changed (a keep rate of 1 there)."""
    shape = reshape_sizes(node)
    if shape is None:
        return False
    before = dense.get(node)
    after = node.meta.get("val")
    if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.dim() == after.dim()
            == len(shape)):
        return False
    changed = [axis for axis in range(len(shape)) if before.shape[axis] != after.shape[axis]]
    literal_axes = [axis for axis, size in enumerate(shape) if size == literal and not isinstance(size, bool)]
    if not changed:
        return static
    return all(isinstance(shape[axis], fx.Node) for axis in changed) and all(
        after.shape[axis] == literal for axis in literal_axes)


def _check_literals(gm: fx.GraphModule, program: TokenProgram, plan: Plan, dense: dict[fx.Node, Any]) -> None:
    """Refuse a literal equal to the token count (or, in a slice, the patch count) that a node after the first
    reducing block takes, unless it sizes an axis apart from the tokens (:func:`_sized_apart`; ``dense``: each
    node's example value before the rewrite)."""
    reduced = [r for r in plan.rows if r.policy is not None]
    if not reduced:
        return
    first = reduced[0]
    static = not any(row.method.cost_per_image for row in reduced)
    start = stream_node(program.gm, first.index)
    tokens = program.blocks[first.index].tokens
    patches = tokens - program.prefix_tokens
    data = data_nodes(gm)  # a table built from constants alone (a position term) keeps the dense layout on purpose
    downstream = False
    for node in gm.graph.nodes:
        downstream = downstream or node is start
        if not downstream or tag_of(node) is not None or node.op not in ("call_function", "call_method"):
            continue
        if node not in data:
            continue
        for value, in_slice in _literals((node.args, node.kwargs)):
            if (value == tokens or (in_slice and value == patches)) and not _sized_apart(node, value, dense, static):
                raise UnsupportedModelError(
                    f"{_where(node)} uses the literal {value}, the token count before block {first.index} reduces "
                    f"tokens ({node.format_node()}); it would compute wrong numbers. Reduce tokens only after it, "
                    "or make the model read the token count from the tensor's shape."
                )


def _propagated(gm: fx.GraphModule, batch: int, store: bool, failure: str, advice: str = "") -> dict[fx.Node, Any]:
    """``gm``'s values on example inputs of ``batch`` (``store``: kept in its nodes' meta), or
    :class:`~fxprune.UnsupportedModelError` saying ``failure`` (what failed), where, why, and ``advice``."""
    try:
        return propagate(gm, batch_size=batch, store=store)
    except ValuePropagationError as err:
        reason = str(err.error).splitlines()[0] if str(err.error) else ""
        raise UnsupportedModelError(
            f"{failure}, {_where(err.node)} fails on a batch of {batch}: {type(err.error).__name__}: {reason}.{advice}"
        ) from err


def verify(gm: fx.GraphModule, program: TokenProgram, plan: Plan, second_batch: bool = True) -> None:
    """Check the rewritten ``gm`` at the captured batch size and (``second_batch``) one more, which shows
    batch sizes fixed as literals; store the example values."""
    gm.graph.lint()
    dense = {node: node.meta.get("val") for node in gm.graph.nodes}
    batches = (program.batch + 1, program.batch) if second_batch else (program.batch,)
    for batch in batches:
        values = _propagated(
            gm, batch, batch == program.batch, f"after the rewrite ({plan.policy.describe()})",
            " That part of the model assumes the original token count; reduce tokens only after it.",
        )
        _check_batch(gm, values, batch)
        _check_selections(program, plan, values)
        _check_guards(gm, program, values)
        _check_position_terms(gm, program, values)
    _check_literals(gm, program, plan, dense)


def verify_training(gm: fx.GraphModule, program: TokenProgram, plan: Plan) -> None:
    """Check the training graph of a learned plan at the captured batch size: it runs on example values and its
    outputs keep the batch."""
    gm.graph.lint()
    values = _propagated(gm, program.batch, True, f"in the training graph of {plan.policy.describe()}")
    _check_batch(gm, values, program.batch)
