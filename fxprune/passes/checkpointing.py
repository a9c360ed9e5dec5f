"""Gradient checkpointing of a training graph's blocks: each block runs as one :func:`checkpointed` call, which keeps
only its inputs for the backward pass and computes its activations again there (``torch.utils.checkpoint``).

A model with gradient checkpointing on (timm's ``set_grad_checkpointing``, Hugging Face's
``gradient_checkpointing_enable``) checkpoints each block in its own code; capture runs through
``torch.utils.checkpoint``, so the captured graph keeps every activation. :func:`checkpoint_blocks` puts it back on
the rewritten training graph, around each block with what the rewrite inserted in it (decisions, selections,
token state): the nodes from the stream entering a block to the stream entering the next are moved into a graph of
their own (:func:`~fxprune.passes.skipping.move_apart`). The values a block hands to :func:`~fxprune.ops.emitting.emit`
leave its call, and are emitted outside it, once (the backward pass computes the block again, not its emissions).
Random ops (dropout, Gumbel noise) draw the same numbers again (the random state is kept).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.utils.checkpoint import checkpoint

from ..analysis import TokenProgram
from ..ops import graph_op
from ..ops.emitting import emit
from .common import graph_order
from .skipping import move_apart

__all__ = ["checkpointed", "checkpoint_blocks", "checkpointing_on"]


@graph_op()
def checkpointed(part: fx.GraphModule, *inputs: Any) -> Any:
    """``part(*inputs)`` whose activations are computed again in the backward pass instead of being kept
    (``torch.utils.checkpoint``, non-reentrant, the random state kept): one block of a training graph."""
    return checkpoint(part.forward, *inputs, use_reentrant=False)


def _ends(program: TokenProgram) -> list[tuple[fx.Node, fx.Node]]:
    """``(entering, leaving)`` stream nodes of each block of ``program``: the stream entering it, and the stream
    entering the next block (after the last, the stream after its residual additions)."""
    blocks = [block for block in program.blocks if block.input in program.stream]
    ends = []
    for block, after in zip(blocks, blocks[1:] + [None]):
        if after is not None:
            ends.append((block.input, after.input))
            continue
        later = program.stream[program.stream.index(block.mid or block.input):]
        if len(later) > 1:
            ends.append((block.input, later[1]))
    return ends


def _checkpoint_region(gm: fx.GraphModule, inner: list[fx.Node], emits: list[fx.Node], name: str) -> None:
    """Replace the nodes ``inner`` (in graph order) by one :func:`checkpointed` call of a graph of them returning
    every value of theirs that a node outside reads, and move the :func:`emit` calls among them, ``emits``, after
    it."""
    members = set(inner)
    outputs = [node for node in inner if any(user not in members for user in node.users)]
    before = inner[-1].next
    part, inputs = move_apart(gm, inner, outputs, before, name)
    with gm.graph.inserting_before(before):
        call = gm.graph.call_function(checkpointed, (part, *inputs))
        results = [gm.graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))] \
            if len(outputs) > 1 else [call]
    for node, result in zip(outputs, results):
        node.replace_all_uses_with(result, delete_user_cb=lambda user: user not in members)
    for node in emits:
        before.prepend(node)
    for node in reversed(inner):
        gm.graph.erase_node(node)


def checkpoint_blocks(gm: fx.GraphModule, program: TokenProgram) -> int:
    """Run each block of ``gm``, a training graph of ``program``, as one :func:`checkpointed` call (see the module
    docstring). Returns how many blocks it checkpointed."""
    order = graph_order(gm)
    regions = []
    for entering, leaving in _ends(program):
        first, last = order(entering), order(leaving)
        nodes = [node for node in gm.graph.nodes if first < order(node) <= last
                 and node.op in ("call_function", "call_method", "call_module")]
        emits = [node for node in nodes if node.target is emit]
        regions.append(([node for node in nodes if node.target is not emit], emits))
    for index, (inner, emits) in enumerate(regions):
        if inner:
            _checkpoint_region(gm, inner, emits, f"checkpointed_block_{index}")
    gm.graph.lint()
    gm.recompile()
    return sum(1 for inner, _ in regions if inner)


def checkpointing_on(model: torch.nn.Module) -> list[str]:
    """The modules of ``model`` with gradient checkpointing on (a ``grad_checkpointing``,
    ``gradient_checkpointing`` or ``activation_checkpointing`` attribute that is True), by name."""
    flags = ("grad_checkpointing", "gradient_checkpointing", "activation_checkpointing")
    return [name or type(model).__name__ for name, module in model.named_modules()
            if any(getattr(module, flag, False) is True for flag in flags)]
