"""ATS: sample tokens by class attention × value norm, inside the attention where it is fused.

At an SDPA site the sampling runs before the attention, from the same ``q``, ``k``, ``v``: only the
sampled queries are attended with (keys stay all ``N``), the output projection runs on them, and the
residual gathers the same rows — the paper's placement, and fewer MACs than attending with every
query and dropping rows afterwards. At an explicit ``softmax(q @ kᵀ) @ v`` the rows are selected
after the residual add instead (same outputs). Either way the padding slots get size 0, which
:func:`~fxprune.passes.tome.thread_sizes` turns into masked keys in every later attention.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from ..analysis import Block, TokenProgram, sdpa_arguments
from ..ops import ats_index, ats_pad, ats_select, gather_queries
from ..ops.selection import gather_tokens
from ..plan import Plan
from ..policies import ATS
from .common import class_scores, insert_call, reroute_sized_stream

_RESHAPES = ("reshape", "view")


def ats_pass(gm: fx.GraphModule, program: TokenProgram, plan: Plan, policy: ATS) -> fx.GraphModule:
    """At each block of ``policy``: sample inside the attention (SDPA) or after the residual add."""
    for row in plan.rows_for(policy):
        block = program.blocks[row.index]
        k, prefix = policy.k_at(row.index), program.prefix_tokens
        if _gathers_queries(block):
            _sample_queries(gm, block, k, prefix)
        else:
            args = (class_scores(gm, block), block.attention.v, k, prefix)
            reroute_sized_stream(gm, block, ats_select, args, policy.method)
    return gm


def _gathers_queries(block: Block) -> bool:
    """Whether ``block``'s attention is an SDPA call whose mask (if any) has no per-query rows."""
    site = block.attention
    if site.kind != "sdpa":
        return False
    mask = sdpa_arguments(site.node)["attn_mask"]
    if mask is None:
        return True
    shape = getattr(mask.meta.get("val"), "shape", None) if isinstance(mask, fx.Node) else None
    return shape is not None and (len(shape) < 2 or shape[-2] == 1)


def _sample_queries(gm: fx.GraphModule, block: Block, max_tokens: int, prefix: int) -> None:
    site, tokens = block.attention, block.tokens
    scores = class_scores(gm, block, before=True)
    pair = insert_call(gm, scores, ats_index, (scores, site.v, max_tokens, prefix), {}, block, "ats_index")
    index = insert_call(gm, pair, operator.getitem, (pair, 0), {}, block, "ats_rows")
    valid = insert_call(gm, index, operator.getitem, (pair, 1), {}, block, "ats_valid")
    queries = insert_call(gm, valid, gather_queries, (site.q, index), {}, block, "ats_queries")
    site.node.replace_input_with(site.q, queries)
    with gm.graph.inserting_after(queries):
        kept = gm.graph.call_method("size", (queries, 2))
    _resize_token_axis(gm, site.node, block.mid, tokens, kept)
    residual = insert_call(gm, block.mid.prev, gather_tokens, (block.input, index), {}, block, "ats_residual")
    block.mid.replace_input_with(block.input, residual)
    reroute_sized_stream(gm, block, ats_pad, (index, valid), "ats")


def _resize_token_axis(gm: fx.GraphModule, start: fx.Node, stop: fx.Node, tokens: int, kept: fx.Node) -> None:
    """Make the reshapes between the attention ``start`` and ``stop`` that use a token count fixed before
    the attention (a shape read or a literal equal to ``tokens``) use ``kept`` (the sampled queries)."""
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
