"""ToMe: merge similar tokens between a block's attention and its MLP, and carry token sizes onwards.

Sizes (how many patches each token stands for) start at the first ToMe or ATS block and follow the
token stream through every later block: each ToMe merge sums them, ATS gathers them (its padding
slots have size 0), an EViT/Top-K selection gathers them (its fused token stands for every dropped
token), and every later attention adds ``log(size)`` of its keys to the logits, as a float
``attn_mask`` to the kept SDPA call: ToMe's proportional attention (unless ``prop_attn=False``), and
−inf for ATS's padding. After ATS the batch is padded (size 0, after each image's own tokens), and every
later reduction also reads the sizes, to reduce each image from its own tokens as it would alone.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from ..analysis import Block, TokenProgram, sdpa_arguments
from ..ops import (
    SIZED_STREAM_FUNCTIONS,
    ats_index,
    class_attention,
    clustered_attention,
    evit_select,
    evit_select_sizes,
    gather_tokens,
    padded_cluster_keys_values,
    size_bias,
    tome_merge,
    topk_rows,
)
from ..plan import Plan, selection_node
from ..policies import ToMe
from .common import SIZES_ROLE, insert_call, reroute_sized_stream

# the nodes a pass inserts beside an attention that read its mask (a per-key bias) as ``attn_mask``
_MASK_READERS = (class_attention, clustered_attention, padded_cluster_keys_values)
# the inserted calls that, in a padded batch, must know each image's own tokens, and the keyword that tells them
# (``size``: the sizes entering the block, whose zeros are padding; ``padded``: True, for ToMe, which has the sizes)
_PADDING_READERS = {ats_index: "size", evit_select: "size", topk_rows: "size", tome_merge: "padded"}


def tome_pass(gm: fx.GraphModule, program: TokenProgram, plan: Plan, policy: ToMe) -> fx.GraphModule:
    """At each block of ``policy``: merge ``r`` token pairs after the residual add (sizes: :func:`thread_sizes`)."""
    for row in plan.rows_for(policy):
        block = program.blocks[row.index]
        args = (block.attention.k, policy.r_at(row.index), program.prefix_tokens)
        reroute_sized_stream(gm, block, tome_merge, args, policy.method)
    return gm


def thread_sizes(gm: fx.GraphModule, program: TokenProgram, plan: Plan) -> fx.GraphModule:
    """Route token sizes from the first ToMe or ATS block through every later block (run after all method
    passes). After an ATS block the batch holds padding (size 0): every later selection also receives the
    sizes, so that each image is reduced from its own tokens (:data:`_PADDING_READERS`)."""
    size: fx.Node | None = None
    proportional = padded = False
    for row in plan.rows:
        block = program.blocks[row.index]
        if size is not None and (proportional or padded):
            _add_size_bias(gm, block, size, proportional)
        if padded:
            for node in _inserted(gm, block, tuple(_PADDING_READERS)):
                keyword = _PADDING_READERS[node.target]
                node.update_kwarg(keyword, size if keyword == "size" else True)
        selection = selection_node(program, row.index) if row.policy is not None else None
        if selection is None:
            continue
        if selection.target in SIZED_STREAM_FUNCTIONS:
            selection.update_arg(1, size)
            size = insert_call(gm, selection.next, operator.getitem, (selection, 1), {}, block, SIZES_ROLE)
            proportional = getattr(row.policy, "prop_attn", proportional)
            padded = padded or row.policy.pads_tokens
        elif selection.target is evit_select and size is not None:
            args, kwargs = (size, *selection.args[1:]), {"padded": padded}
            size = insert_call(gm, selection, evit_select_sizes, args, kwargs, block, SIZES_ROLE)
        elif selection.target is gather_tokens and size is not None:  # Top-K's rows, kept inside the attention
            size = insert_call(gm, selection, gather_tokens, (size, selection.args[1]), {}, block, SIZES_ROLE)
    return gm


def _inserted(gm: fx.GraphModule, block: Block, targets: tuple) -> list[fx.Node]:
    """The nodes a pass inserted for ``block`` that call one of ``targets``."""
    return [n for n in gm.graph.nodes if n.target in targets and n.meta.get("fxprune", {}).get("block") == block.index]


def _add_size_bias(gm: fx.GraphModule, block: Block, size: fx.Node, proportional: bool) -> None:
    """Add ``log(size)`` of the keys (not ``proportional``: only −inf for padding, size 0) to ``block``'s
    attention logits: as (part of) the attention mask of the
    SDPA call, of the nodes that read that mask beside it (class-attention scores, ClusTR's clustering,
    which turns it into key weights), or onto the logits of an explicit softmax."""
    site = block.attention
    readers = _inserted(gm, block, _MASK_READERS)
    if site.kind == "sdpa" and not any(n.target is clustered_attention for n in readers):
        readers.append(site.node)
    if not readers:
        logits = site.node.args[0]
        bias = insert_call(gm, logits, size_bias, (size, None, logits, proportional), {}, block, "size_bias")
        biased = insert_call(gm, bias, operator.add, (logits, bias), {}, block, "biased_logits")
        site.node.replace_input_with(logits, biased)
        return
    first = next(n for n in gm.graph.nodes if n in readers)
    mask = sdpa_arguments(first)["attn_mask"] if first is site.node else first.kwargs.get("attn_mask")
    bias = insert_call(gm, first.prev, size_bias, (size, mask, site.q, proportional), {}, block, "size_bias")
    for node in readers:
        if node is site.node and len(node.args) > 3:
            node.update_arg(3, bias)
        else:
            node.update_kwarg("attn_mask", bias)
