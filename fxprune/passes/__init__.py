"""Shared graph surgery: the block-rewrite loop, insertion helpers (:mod:`.common`), token-state threading
(:mod:`.state`), position terms at the remaining rows' positions (:mod:`.positions`) and learned submodules
(:mod:`.learned`). Each method's own rewrite is in :mod:`fxprune.methods`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch.fx as fx

from ..analysis import TokenProgram, ancestors
from ..errors import FxPruneError
from ..ops import op_of
from .common import Rewrite, Role, stream_tokens, tag
from .positions import place_position_terms
from .restore import restore_layout, restores_layout, restores_output
from .state import thread_state

if TYPE_CHECKING:
    from ..planning import PlanRow

__all__ = ["apply_passes", "rewrite_blocks"]


def rewrite_blocks(gm: fx.GraphModule, program: TokenProgram, rows: Sequence[PlanRow], train: bool = False) -> None:
    """Run each planned block's rewrite on ``gm`` (the program's graph module) and tag the node that carries its
    new token stream; ``train``: the training rewrite of learned methods. Raises when an evaluation rewrite breaks
    the contract (a reducing method whose rewrite names no stream node, or one whose function declares no role)."""
    carried: dict[fx.Node, fx.Node] = {}  # a rewritten block's stream node after its attention → its new tokens
    inputs = {block.input for block in program.blocks}  # a parallel block's stream node after it is one of them
    for row in rows:
        if row.method is None:
            continue
        rewrite = row.method.rewrite
        if train and row.method.learned is not None:
            rewrite = row.method.learned.train_rewrite
        block = program.blocks[row.index]
        if block.input in carried:  # after a parallel block, whose residual add is the next block's input
            block = dataclasses.replace(block, input=carried[block.input])
        result = rewrite(gm, program, block, row.policy)
        if not isinstance(result, Rewrite):
            raise FxPruneError(f"the rewrite of method {row.method.name!r} returned {result!r}, not a Rewrite")
        if not train:  # a training graph keeps every row (static shapes)
            _check_stream(row, result)
        if result.stream is not None:
            tag(result.stream, row.index, Role.STREAM)
            if block.mid in inputs and block.mid in ancestors([result.stream]):
                carried[block.mid] = stream_tokens(result.stream)


def _check_stream(row: PlanRow, result: Rewrite) -> None:
    method = row.method
    if result.stream is None:
        if method.reduces_tokens:
            raise FxPruneError(
                f"the rewrite of method {method.name!r} at block {row.index} changes the token rows but names no "
                "stream node: return Rewrite(stream=node)"
            )
        return
    op = op_of(result.stream.target)
    if op is None or not op.stream:
        raise FxPruneError(
            f"method {method.name!r}: its stream node {result.stream.name} calls a function not declared as a "
            "stream function: decorate it with fxprune.ops.graph_op(stream=True)"
        )
    if op.sized != method.carries_sizes:
        raise FxPruneError(
            f"method {method.name!r} declares carries_sizes={method.carries_sizes}, but its stream function "
            f"{result.stream.target.__name__} is {'' if op.sized else 'not '}sized"
        )


def apply_passes(
    gm: fx.GraphModule, program: TokenProgram, rows: Sequence[PlanRow], train: bool = False, restore: bool = True
) -> fx.GraphModule:
    """Rewrite every planned block of ``gm``, take later blocks' position terms at the remaining rows' positions,
    thread token state through the blocks (sizes, positions), then give a dense output its original token
    layout back (``restore=False``: return each row's original position beside it)."""
    rewrite_blocks(gm, program, rows, train)
    place_position_terms(gm, program, rows)
    thread_state(gm, program, rows,
                 restored=not train and restore and restores_layout(program, rows) and restores_output(program))
    if not train:  # a training graph keeps every row
        restore_layout(gm, program, rows, restore)
    gm.graph.lint()
    gm.recompile()
    return gm
