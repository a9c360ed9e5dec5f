"""ToMe: merge similar tokens between a block's attention and its MLP, and carry token sizes onwards.

Sizes (how many patches each token stands for) start at the first ToMe or ATS block and follow the
token stream through every later block: each ToMe merge sums them, ATS gathers them (its padding
slots have size 0), an EViT/Top-K selection gathers them (its fused token stands for every dropped
token), and every later attention adds ``log(size)`` of its keys to the logits, as a float
``attn_mask`` to the kept SDPA call: ToMe's proportional attention (unless ``prop_attn=False``), and
−inf for ATS's padding.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from ..analysis import Block, TokenProgram, sdpa_arguments
from ..ops import (
    SIZED_STREAM_FUNCTIONS,
    class_attention,
    clustered_attention,
    evit_select,
    evit_select_sizes,
    gather_tokens,
    padded_cluster_keys_values,
    size_bias,
    tome_merge,
)
from ..plan import Plan, selection_node
from ..policies import ToMe
from .common import SIZES_ROLE, insert_call, reroute_sized_stream

# the nodes a pass inserts beside an attention that read its mask (a per-key bias) as ``attn_mask``
_MASK_READERS = (class_attention, clustered_attention, padded_cluster_keys_values)


def tome_pass(gm: fx.GraphModule, program: TokenProgram, plan: Plan, policy: ToMe) -> fx.GraphModule:
    """At each block of ``policy``: merge ``r`` token pairs after the residual add (sizes: :func:`thread_sizes`)."""
    for row in plan.rows_for(policy):
        block = program.blocks[row.index]
        args = (block.attention.k, policy.r_at(row.index), program.prefix_tokens)
        reroute_sized_stream(gm, block, tome_merge, args, policy.method)
    return gm


def thread_sizes(gm: fx.GraphModule, program: TokenProgram, plan: Plan) -> fx.GraphModule:
    """Route token sizes from the first ToMe or ATS block through every later block (run after all method
    passes)."""
    size: fx.Node | None = None
    proportional = False
    for row in plan.rows:
        block = program.blocks[row.index]
        if size is not None and proportional:
            _add_size_bias(gm, block, size)
        selection = selection_node(program, row.index) if row.policy is not None else None
        if selection is None:
            continue
        if selection.target in SIZED_STREAM_FUNCTIONS:
            selection.update_arg(1, size)
            size = insert_call(gm, selection.next, operator.getitem, (selection, 1), {}, block, SIZES_ROLE)
            proportional = getattr(row.policy, "prop_attn", True)
        elif selection.target is evit_select and size is not None:
            size = insert_call(gm, selection, evit_select_sizes, (size, *selection.args[1:]), {}, block, SIZES_ROLE)
        elif selection.target is gather_tokens and size is not None:  # Top-K's rows, kept inside the attention
            size = insert_call(gm, selection, gather_tokens, (size, selection.args[1]), {}, block, SIZES_ROLE)
    return gm


def _add_size_bias(gm: fx.GraphModule, block: Block, size: fx.Node) -> None:
    """Add ``log(size)`` of the keys to ``block``'s attention logits: as (part of) the attention mask of the
    SDPA call, of the nodes that read that mask beside it (class-attention scores, ClusTR's clustering,
    which turns it into key weights), or onto the logits of an explicit softmax."""
    site = block.attention
    readers = [n for n in gm.graph.nodes if n.target in _MASK_READERS and n.meta["fxprune"]["block"] == block.index]
    if site.kind == "sdpa" and not any(n.target is clustered_attention for n in readers):
        readers.append(site.node)
    if not readers:
        logits = site.node.args[0]
        bias = insert_call(gm, logits, size_bias, (size, None, logits), {}, block, "size_bias")
        biased = insert_call(gm, bias, operator.add, (logits, bias), {}, block, "biased_logits")
        site.node.replace_input_with(logits, biased)
        return
    first = next(n for n in gm.graph.nodes if n in readers)
    mask = sdpa_arguments(first)["attn_mask"] if first is site.node else first.kwargs.get("attn_mask")
    bias = insert_call(gm, first.prev, size_bias, (size, mask, site.q), {}, block, "size_bias")
    for node in readers:
        if node is site.node and len(node.args) > 3:
            node.update_arg(3, bias)
        else:
            node.update_kwarg("attn_mask", bias)
