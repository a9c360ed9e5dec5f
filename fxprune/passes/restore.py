"""The original token layout for a model whose output is every token (a dense output: patch features, a
segmentation head on the token grid).

After the rewrites, each reducing block's stream node is also applied to the identity over its input rows
(:func:`~fxprune.ops.restoring.row_identity`), which gives its row map; the maps, followed from the model's first
stream, say which row holds each original token (:func:`~fxprune.ops.restoring.follow_rows`), and each
reduction records the state of every token it receives (:func:`~fxprune.ops.restoring.token_states`). After the
last block the stream is replaced by the original layout: each token's holding row (kept, or the row it was merged
into), or, once dropped, its state where its block dropped it (the value the block's selection read: its input
for a selection made before the attention, EViT's after it; EViT's fused token holds no token, its row map
leaves it out: ``fxprune.ops.selection.evit_select_rows``). Everything is static in shape: per image in a padded
batch, one graph under ``torch.compile``, and the MACs of the extra nodes count in their blocks.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch.fx as fx

from ..analysis import TokenProgram, final_tokens, last_self_attention, module_path
from ..capture.values import propagate
from ..ops import POSITIONS, ROWS, initial_state, op_of
from ..ops.restoring import first_rows, follow_rows, pad_reduced_rows, row_identity, token_states
from .common import Role, insert_call, stream_node, tag, tag_of

if TYPE_CHECKING:
    from ..planning import PlanRow

__all__ = ["restore_layout", "restores_layout", "return_positions"]


def restore_layout(gm: fx.GraphModule, program: TokenProgram, rows: Sequence[PlanRow], restore: bool = True) -> None:
    """Give a dense-output model the original token layout after its last block (see the module docstring); no
    change when the output reads no patch rows one by one or no block changes the rows. ``restore=False``: keep the
    reduced rows and return, beside the model's output, each row's original position (:func:`return_positions`)."""
    if not restores_layout(program, rows):
        return
    end = _restore_point(program)
    held = recorded = None
    steps: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if _moves_rows(node):
            steps.setdefault(tag_of(node).block, []).append(node)
    if not steps:
        return
    if not restore:  # the channel follows each block's stream node (its rule includes the block's row choice)
        return_positions(gm, program, [node for index in steps if (node := stream_node(gm, index)) is not None])
        return
    for index, nodes in steps.items():  # one row map per block: its stream functions in turn on the identity
        block, tokens = program.blocks[index], nodes[0].args[0]
        anchor = nodes[0].prev
        if held is None:
            held = anchor = _insert(gm, anchor, first_rows, (tokens,), block, "first_rows")
        recorded = anchor = _insert(gm, anchor, token_states, (recorded, tokens, held), block, "token_states")
        mapped = anchor = _insert(gm, anchor, row_identity, (tokens,), block, "row_identity")
        for node in nodes:  # each right before its stream function, whose arguments are computed by then
            rule = op_of(node.target).follows_with(ROWS) or node.target
            mapped = anchor = _insert(gm, node.prev, rule, (mapped, *node.args[1:]), block, "row_map",
                                      dict(node.kwargs))
            if op_of(node.target).sized:
                mapped = anchor = _insert(gm, anchor, operator.getitem, (mapped, 0), block, "row_map_rows")
        held = _insert(gm, anchor, follow_rows, (held, mapped), block, "held_rows")
    last = program.blocks[max(steps)]
    restored = _insert(gm, end, token_states, (recorded, end, held), last, "restored_layout")
    end.replace_all_uses_with(restored, delete_user_cb=lambda user: user is not restored)


def restores_layout(program: TokenProgram, rows: Sequence[PlanRow]) -> bool:
    """Whether :func:`restore_layout` puts the original token layout back for the plan ``rows``: the output reads
    patch rows one by one and a block changes the rows. The blocks after the last one of self-attention (an
    attention pool) then read every original token once."""
    reduces = any(r.method is not None and r.method.reduces_tokens for r in rows)
    return program.readout.patches == "dense" and reduces and _restore_point(program) is not None


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


def _restore_point(program: TokenProgram) -> fx.Node | None:
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
