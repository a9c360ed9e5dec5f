"""Position-dependent attention after a reduction.

A block whose attention reads *position terms* (tensors built without the input's values and laid out per token
position: a relative position bias, rotary tables; :class:`~fxprune.analysis.PositionTerm`) computes them for every
token of the dense model. Once rows are removed, each remaining row keeps its original position: the block takes
its terms at the positions channel's values (each row's index in the first block's input), per image, where its
attention reads them (:func:`~fxprune.ops.at_positions`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from ..analysis import Block, PositionTerm, TokenProgram, descendants, reachable
from ..ops import POSITIONS, at_positions
from ..ops.gating import batch_rows
from ..readout import data_nodes, is_shape_read
from .common import graph_order, insert_call, model_tokens, stream_node, tag_of
from .state import follow_state, read_state

if TYPE_CHECKING:
    from ..planning import PlanRow

__all__ = ["place_position_terms", "place_terms"]


def _met_ranks(reader: fx.Node, value: fx.Node, depth: int = 2) -> list[int]:
    """The ranks of ``reader``'s other tensor inputs with a known value, else (a node a rewrite inserted that reads
    ``value`` alone, such as the kept queries' rows of a mask) those ``reader``'s users meet it with."""
    ranks = [n.meta["val"].dim() for n in reader.all_input_nodes
             if n is not value and isinstance(n.meta.get("val"), torch.Tensor)]
    if not ranks and depth:
        ranks = [rank for user in reader.users for rank in _met_ranks(user, reader, depth - 1)]
    return ranks


def _rank(reader: fx.Node, term: fx.Node) -> int:
    """The rank of the values ``term`` meets at ``reader`` (the widest, :func:`_met_ranks`)."""
    return max(_met_ranks(reader, term), default=term.meta["val"].dim() + 1)


def place_position_terms(gm: fx.GraphModule, program: TokenProgram, rows: Sequence[PlanRow]) -> None:
    """Make every block whose attention sees other rows than the dense model's read its position terms at its
    rows' positions (run before token-state threading, which wires the positions channel it reads). The first
    block that removes rows sees them all unless it removes them before its attention (DynamicViT, at its input)."""
    reducing = [row.index for row in rows if row.method is not None and row.method.reduces_tokens]
    if not reducing or not any(block.position_terms for block in program.blocks[min(reducing):]):
        return
    order = graph_order(gm)
    shortened, data = descendants(program.blocks[min(reducing)].input), data_nodes(gm)
    for block in program.blocks[min(reducing):]:
        stream = stream_node(gm, block.index)
        before = stream is not None and order(stream) < order(block.attention.node)
        if not any(_term_readers(block, term) for term in block.position_terms) or \
                (block.index == min(reducing) and not before):
            continue  # no terms, or the block's rewrite took them at its own rows (AdaViT's used rows)
        _count_every_token(gm, program, block, shortened, data)
        positions = read_state(gm, block, POSITIONS)
        if before:
            positions = follow_state(gm, block, stream, POSITIONS, positions)
        place_terms(gm, program, block, positions)


def _count_every_token(gm: fx.GraphModule, program: TokenProgram, block: Block, shortened: set[fx.Node],
                       data: set[fx.Node]) -> None:
    """Make ``block``'s position terms count every token where they count the rows of a value that a reduction
    shortens (``shortened``; V-JEPA 2 numbers its rotary positions ``arange(x.size(1))`` of its attention's input):
    so they stay laid out for every token, as the positions channel indexes them, and do not follow the rows that
    remain. ``data``: the nodes computed from the input's values, where the search for such counts stops."""
    if block.tokens != program.tokens:
        return
    for term in block.position_terms:
        computing = reachable([term.node], lambda node: () if node in data else node.all_input_nodes)
        for count in [node for node in computing if node in shortened and _counts_rows(node, block.tokens)]:
            every = model_tokens(gm, program)
            for user in [user for user in count.users if user in computing]:
                user.replace_input_with(count, every)


def _counts_rows(node: fx.Node, tokens: int) -> bool:
    """Whether ``node`` reads a size from a tensor's shape (``x.size(1)``, ``x.shape[1]``) that equals ``tokens``:
    a count of its rows, or a size of another axis that happens to equal it, which no reduction changes, so reading
    the model's token count in its place gives the same value."""
    value = node.meta.get("val")
    if not isinstance(value, int) or isinstance(value, bool) or value != tokens or tag_of(node) is not None:
        return False
    return is_shape_read(node) or (node.op == "call_function" and node.target is operator.getitem
                                   and isinstance(node.args[0], fx.Node) and is_shape_read(node.args[0]))


def _term_readers(block: Block, term: PositionTerm) -> list[fx.Node]:
    """The nodes that read ``term`` as the dense model computes it: its readers the analysis saw that are still in
    the graph (a rewrite may have replaced the attention node), and those ``block``'s rewrite inserted beside them
    (scores reading its mask)."""
    return [user for user in term.node.users if user.target is not at_positions
            and (user in term.readers or ((found := tag_of(user)) is not None and found.block == block.index))]


def _per_image(term: fx.Node, rank: int, batch: int) -> bool:
    """Whether ``term`` has a table per image (``[B, …]`` of the ``rank`` of the values it meets, ``batch`` the
    captured batch size): a mask made from the batch's size."""
    shape = term.meta["val"].shape
    return len(shape) == rank and shape[0] == batch > 1


def place_terms(gm: fx.GraphModule, program: TokenProgram, block: Block, positions: fx.Node,
                images: fx.Node | None = None) -> list[fx.Node]:
    """Make each reader of ``block``'s position terms (its attention's, and what the block's rewrite inserted
    beside it, such as scores reading its mask) read them at ``positions`` ``[B, N', 1]``; ``images`` ``[b]``: the
    images of the batch those are of (None: all), at which a term with a table per image is taken first. Returns
    the nodes that take them."""
    placed_all = []
    for term in block.position_terms:
        for reader in _term_readers(block, term):
            rank, value = _rank(reader, term.node), term.node
            if images is not None and _per_image(term.node, rank, program.batch):
                value = insert_call(gm, reader.prev, batch_rows, (value, images), {}, block, "term_images")
            args = (value, positions, term.axes, term.patches_only, program.prefix_tokens, rank)
            after = reader.prev if value is term.node else value
            placed = insert_call(gm, after, at_positions, args, {}, block, "at_positions")
            reader.replace_input_with(term.node, placed)
            placed_all.append(placed)
    return placed_all
