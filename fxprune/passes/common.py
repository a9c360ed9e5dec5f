"""Graph surgery shared by the passes: inserting nodes for a block and rerouting the token stream."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch.fx as fx

from ..analysis import Block, sdpa_arguments
from ..ops import class_attention, class_attention_from_probs


def insert_call(
    gm: fx.GraphModule, after: fx.Node, fn: Callable, args: tuple, kwargs: dict[str, Any], block: Block, role: str
) -> fx.Node:
    """Insert ``fn(*args, **kwargs)`` after ``after``, tagged as fxprune's node ``role`` of ``block``."""
    with gm.graph.inserting_after(after):
        node = gm.graph.create_node("call_function", fn, args, kwargs, name=f"{block.name.replace('.', '_')}_{role}")
    node.meta["nn_module_stack"] = dict(block.mid.meta.get("nn_module_stack") or {})
    node.meta["fxprune"] = {"block": block.index, "role": role}
    return node


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
