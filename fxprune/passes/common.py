"""Graph surgery shared by the passes: inserting nodes for a block and rerouting the token stream."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch.fx as fx

from ..analysis import Block, TokenProgram, sdpa_arguments
from ..ops import class_attention, class_attention_from_probs, gather_queries, gather_tokens

_RESHAPES = ("reshape", "view")
SIZES_ROLE = "sizes"  # the role of inserted nodes that carry token sizes beside the token stream


def insert_call(
    gm: fx.GraphModule,
    after: fx.Node,
    fn: Callable | str,
    args: tuple,
    kwargs: dict[str, Any],
    block: Block,
    role: str,
    op: str = "call_function",
) -> fx.Node:
    """Insert ``fn(*args, **kwargs)`` (``op="call_method"``: the method named ``fn`` of ``args[0]``) after
    ``after``, tagged as fxprune's node ``role`` of ``block``."""
    with gm.graph.inserting_after(after):
        node = gm.graph.create_node(op, fn, args, kwargs, name=f"{block.name.replace('.', '_')}_{role}")
    node.meta["nn_module_stack"] = dict(block.mid.meta.get("nn_module_stack") or {})
    node.meta["fxprune"] = {"block": block.index, "role": role}
    return node


def model_tokens(gm: fx.GraphModule, program: TokenProgram) -> fx.Node:
    """A node reading the number of tokens entering the model's first block (``N`` of its ``[B, N, C]``
    input), inserted once and shared."""
    first = program.blocks[0].input
    existing = [n for n in first.users if n.meta.get("fxprune", {}).get("role") == "model_tokens"]
    if existing:
        return existing[0]
    return insert_call(gm, first, "size", (first, 1), {}, program.blocks[0], "model_tokens", op="call_method")


def class_scores(gm: fx.GraphModule, block: Block, before: bool = False) -> fx.Node:
    """Insert the head-averaged class-attention row ``[B, N]`` of ``block``'s attention, beside it
    (``before`` the SDPA call, for a pass that changes its inputs; SDPA sites only)."""
    site = block.attention
    if site.kind == "sdpa":
        args = sdpa_arguments(site.node)
        kwargs = {"scale": args["scale"], "attn_mask": args["attn_mask"]}
        after = site.node.prev if before else site.node
        return insert_call(gm, after, class_attention, (site.q, site.k), kwargs, block, "class_attn")
    return insert_call(gm, site.node, class_attention_from_probs, (site.node,), {}, block, "class_attn")


def reroute_stream(gm: fx.GraphModule, block: Block, fn: Callable, args: tuple, role: str) -> fx.Node:
    """Insert ``fn(mid, *args)`` right after ``block.mid`` and make every later use of ``mid`` use it."""
    mid = block.mid
    node = insert_call(gm, mid, fn, (mid, *args), {}, block, role)
    mid.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    return node


def reroute_sized_stream(gm: fx.GraphModule, block: Block, fn: Callable, args: tuple, role: str) -> fx.Node:
    """Insert ``fn(mid, None, *args) -> (tokens, sizes)`` after ``block.mid`` and route the stream through its
    tokens; the sizes argument (None) is wired later by :func:`fxprune.passes.tome.thread_sizes`."""
    mid = block.mid
    node = insert_call(gm, mid, fn, (mid, None, *args), {}, block, role)
    tokens = insert_call(gm, node, operator.getitem, (node, 0), {}, block, f"{role}_tokens")
    mid.replace_all_uses_with(tokens, delete_user_cb=lambda user: user is not node)
    return node


def gathers_queries(block: Block) -> bool:
    """Whether ``block``'s attention is an SDPA call whose mask (if any) has no per-query rows, so that a
    selection known before it can attend with the kept queries only."""
    site = block.attention
    if site.kind != "sdpa":
        return False
    mask = sdpa_arguments(site.node)["attn_mask"]
    if mask is None:
        return True
    shape = getattr(mask.meta.get("val"), "shape", None) if isinstance(mask, fx.Node) else None
    return shape is not None and (len(shape) < 2 or shape[-2] == 1)


def select_queries(gm: fx.GraphModule, block: Block, rows: fx.Node) -> fx.Node:
    """Keep the token rows ``rows`` ``[B, K]`` inside ``block``'s attention (see :func:`gathers_queries`):
    only those queries attend (keys and values stay all ``N``), the output projection runs on ``K`` rows
    and the residual add gathers the same rows. Same outputs as selecting after the add, fewer MACs.
    Returns the residual's row gather, whose output ``[B, K, C]`` is the block's new token stream."""
    site = block.attention
    queries = insert_call(gm, rows, gather_queries, (site.q, rows), {}, block, "kept_queries")
    site.node.replace_input_with(site.q, queries)
    with gm.graph.inserting_after(queries):
        kept = gm.graph.call_method("size", (queries, 2))
    _resize_token_axis(gm, site.node, block.mid, block.tokens, kept)
    residual = insert_call(gm, block.mid.prev, gather_tokens, (block.input, rows), {}, block, "kept_residual")
    block.mid.replace_input_with(block.input, residual)
    return residual


def _resize_token_axis(gm: fx.GraphModule, start: fx.Node, stop: fx.Node, tokens: int, kept: fx.Node) -> None:
    """Make the reshapes between the attention ``start`` and ``stop`` that use a token count fixed before
    the attention (a shape read or a literal equal to ``tokens``) use ``kept`` (the kept queries)."""
    downstream, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in downstream and node is not stop:
            downstream.add(node)
            todo.extend(node.users)
    for node in downstream:
        if node.op != "call_method" or node.target not in _RESHAPES:
            continue
        packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
        shape = list(node.args[1]) if packed else list(node.args[1:])
        resized = [kept if _read_before(size, downstream) == tokens else size for size in shape]
        if resized != shape:
            node.args = (node.args[0], tuple(resized)) if packed else (node.args[0], *resized)


def _read_before(size: object, downstream: set[fx.Node]) -> object:
    """The value of a reshape's ``size`` argument when it was fixed before the attention, else None."""
    if isinstance(size, fx.Node):
        return None if size in downstream else size.meta.get("val")
    return size
