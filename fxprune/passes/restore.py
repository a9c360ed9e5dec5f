"""The original token layout for a model whose output reads every token in its place (a dense output: patch
features; a segmentation or depth head over the token grid), and wherever it reads intermediate blocks' tokens apart
from the stream (the necks of DPT and Depth Anything, timm's ``features_only``).

After the rewrites, each reducing block's stream functions also say where they send each input row (their
destinations, :mod:`fxprune.ops.restoring`); followed from the model's first stream, these say which row holds
each original token (:func:`~fxprune.ops.restoring.follow_rows`), and each reduction records the state of every
token it receives (:func:`~fxprune.ops.restoring.token_states`). After the last block the stream is replaced by the
original layout: each token's holding row (kept, or the row it was merged into), or, once dropped, its state where
its block dropped it (the value the block's selection read: its input for a selection made before the attention,
EViT's after it; EViT's fused token holds no token, its destinations leave it out:
``fxprune.ops.selection.evit_select_rows``). A read of an intermediate block's tokens gets the same, from the
reductions made before it. Everything is static in shape: per image in a padded batch, one graph under
``torch.compile``, and the MACs of the extra nodes count in their blocks.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch.fx as fx

from ..analysis import Block, TokenProgram, final_tokens, last_self_attention, module_path
from ..capture.values import propagate
from ..ops import POSITIONS, ROWS, initial_state, op_of
from ..ops.restoring import first_rows, follow_rows, heaviest_rows, pad_reduced_rows, row_identity, token_states
from .common import Role, graph_order, insert_call, stream_node, tag, tag_of

if TYPE_CHECKING:
    from ..planning import PlanRow

__all__ = ["restore_layout", "restore_point", "restores_layout", "restores_output", "return_positions"]


def restore_layout(gm: fx.GraphModule, program: TokenProgram, rows: Sequence[PlanRow], restore: bool = True) -> None:
    """Give a model whose output reads its tokens in their places the original token layout after its last block,
    and each value of the stream that it reads apart (intermediate blocks' tokens) where it reads it (see the
    module docstring); no change when no block changes the rows. ``restore=False``: keep the reduced rows and
    return, beside the model's output, each row's original position (:func:`return_positions`)."""
    if not restores_layout(program, rows):
        return
    steps: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if _moves_rows(node):
            steps.setdefault(tag_of(node).block, []).append(node)
    if not steps:
        return
    if not restore:  # the channel follows each block's stream node (its rule includes the block's row choice)
        return_positions(gm, program, [node for index in steps if (node := stream_node(gm, index)) is not None])
        return
    states = _token_states(gm, program, steps)
    if restores_output(program):
        end = restore_point(program)
        _restore_at(gm, program.blocks[max(steps)], states[max(steps)], end, "restored_layout", list(end.users))
    order = graph_order(gm)
    for value, reader in program.reads_apart:  # each reads the value as the model computes it there
        read = next(node for node in reader.all_input_nodes if _read_in_place_of(node, value))
        done = [index for index, nodes in steps.items() if order(nodes[-1]) < order(value)]
        if done:
            _restore_at(gm, program.blocks[done[-1]], states[done[-1]], value, "read_apart_layout", [reader], read)
        else:
            reader.replace_input_with(read, value)


def _read_in_place_of(node: fx.Node, value: fx.Node) -> bool:
    """Whether a reader of ``value`` that now reads ``node`` reads it in place of ``value``: ``node`` is ``value``,
    or a selection made at it (stream functions from ``value`` on, or their tokens: DynamicViT's at a block's input,
    any method's after a parallel block, whose output is ``value``)."""
    if node.target is operator.getitem:
        node = node.args[0]
    while node is not value and _moves_rows(node):
        node = node.args[0]
    return node is value


def _token_states(
    gm: fx.GraphModule, program: TokenProgram, steps: dict[int, list[fx.Node]]
) -> dict[int, tuple[fx.Node, fx.Node]]:
    """For each block with stream functions ``steps``: the recorded states of the tokens it and earlier blocks
    dropped, and the row holding each original token after it (its stream functions' destinations, followed in
    turn)."""
    held = recorded = None
    states = {}
    for index, nodes in steps.items():
        block, tokens = program.blocks[index], nodes[0].args[0]
        anchor = nodes[0].prev
        if held is None:
            held = anchor = _insert(gm, anchor, first_rows, (tokens,), block, "first_rows")
        recorded = _insert(gm, anchor, token_states, (recorded, tokens, held), block, "token_states")
        for node in nodes:  # each right before its stream function, whose arguments are computed by then
            destinations = _destinations(gm, node, block)
            held = _insert(gm, destinations, follow_rows, (held, destinations), block, "held_rows")
        states[index] = (recorded, held)
    return states


def _destinations(gm: fx.GraphModule, node: fx.Node, block: Block) -> fx.Node:
    """Where the stream function ``node`` sends each of its input rows (:data:`~fxprune.ops.ROWS`), computed right
    before it: its declared rule, else the heaviest rows of its result on the identity over its input rows."""
    op = op_of(node.target)
    rule, args, kwargs = op.follows_with(ROWS), node.args[1:], dict(node.kwargs)
    if rule is not None:
        return _insert(gm, node.prev, rule, node.args, block, "destinations", kwargs)
    identity = _insert(gm, node.prev, row_identity, (node.args[0],), block, "row_identity")
    mapped = _insert(gm, identity, node.target, (identity, *args), block, "row_map", kwargs)
    if op.sized:
        mapped = _insert(gm, mapped, operator.getitem, (mapped, 0), block, "row_map_rows")
    return _insert(gm, mapped, heaviest_rows, (mapped,), block, "destinations")


def _restore_at(gm: fx.GraphModule, block: Block, state: tuple[fx.Node, fx.Node], value: fx.Node, name: str,
                readers: Sequence[fx.Node], read: fx.Node | None = None) -> None:
    """Make ``readers`` of the token rows ``value`` (or of ``read``, which they read in its place), left by
    ``block`` and earlier reductions with ``state`` (their recorded tokens and held rows), read the original token
    layout instead."""
    recorded, held = state
    restored = _insert(gm, value, token_states, (recorded, value, held), block, name)
    for reader in readers:
        reader.replace_input_with(value if read is None else read, restored)


def restores_layout(program: TokenProgram, rows: Sequence[PlanRow]) -> bool:
    """Whether :func:`restore_layout` puts the original token layout back for the plan ``rows``: a block changes
    the rows, and the output reads them in their places (:func:`restores_output`) or reads intermediate blocks'
    tokens apart from the stream."""
    reduces = any(r.method is not None and r.method.reduces_tokens for r in rows)
    return reduces and (restores_output(program) or bool(program.reads_apart))


def restores_output(program: TokenProgram) -> bool:
    """Whether the final tokens get the original layout back once reduced: the output reads every patch row in its
    place (a dense output, or convolutions over their grid). The blocks after the last one of self-attention (an
    attention pool) then read every original token once."""
    return program.readout.patches in ("dense", "ordered") and restore_point(program) is not None


def layout_restored(gm: fx.GraphModule) -> bool:
    """Whether an fxprune transform follows the rows of ``gm``'s blocks to its output (it put the original token
    layout back, or returns each row's original position): its nodes carry the rows' channel."""
    return any((found := tag_of(node)) is not None and found.channel == ROWS for node in gm.graph.nodes)


def return_positions(gm: fx.GraphModule, program: TokenProgram, moves: Sequence[fx.Node]) -> None:
    """Make ``gm`` return ``(output, positions)``: ``positions`` ``[B, N']`` the original index of each row of the
    final tokens (the positions channel after the blocks' stream nodes ``moves``, in order: a row standing for
    several patches has one of theirs, docs/methods.md; −1 for padding). Both are padded to the layout's static
    row count ``N'`` whatever the batch (padding rows zero), as compiled and exported graphs have them."""
    first = moves[0]
    block = program.blocks[tag_of(first).block]
    positions = _insert(gm, first.prev, initial_state, (block.input, POSITIONS), block, "first_positions")
    for node in moves:
        rule = op_of(node.target).follows_with(POSITIONS)
        block = program.blocks[tag_of(node).block]
        positions = _insert(gm, node, rule, (positions, *node.args[1:]), block, "positions", dict(node.kwargs))
    rows = _insert(gm, positions, operator.getitem, (positions, (Ellipsis, 0)), block, "row_positions")
    output = gm.graph.output_node()
    output.update_arg(0, (output.args[0], rows))
    final = final_tokens(program)
    if final is None:
        return
    width = propagate(gm, store=False)[rows].shape[1]  # the static count: fake values take the worst case
    padded = _insert(gm, final, pad_reduced_rows, (final, rows, width), program.blocks[-1], "padded_rows")
    tokens = _insert(gm, padded, operator.getitem, (padded, 0), program.blocks[-1], "padded_tokens")
    padded_positions = _insert(gm, tokens, operator.getitem, (padded, 1), program.blocks[-1], "padded_positions")
    final.replace_all_uses_with(tokens, delete_user_cb=lambda user: user is not padded)
    output.replace_input_with(rows, padded_positions)


def _moves_rows(node: fx.Node) -> bool:
    """Whether ``node`` is a stream function a rewrite inserted on the token stream (not on a state channel)."""
    found, op = tag_of(node), op_of(node.target)
    return found is not None and found.role is not Role.STATE and op is not None and op.stream


def _insert(gm: fx.GraphModule, after: fx.Node, fn, args: tuple, block, name: str, kwargs=None) -> fx.Node:
    """A node of this pass (a state of its own, :data:`ROWS`) inserted after ``after``."""
    return tag(insert_call(gm, after, fn, args, kwargs or {}, block, name), block, Role.STATE, ROWS)


def restore_point(program: TokenProgram) -> fx.Node | None:
    """The stream's value leaving the last block of self-attention (before a final norm, which then normalises the
    restored rows alike), or the final tokens when no stream node is known inside that block."""
    final = final_tokens(program)
    if final is None:
        return None
    block = last_self_attention(program.blocks)
    start = program.stream.index(block.mid or block.input) if (block.mid or block.input) in program.stream else None
    if start is None:
        return final
    inside = [n for n in program.stream[start:program.stream.index(final) + 1]
              if module_path(n) == block.name or module_path(n).startswith(block.name + ".")]
    return inside[-1] if inside else final
