"""Token state: per-row values that travel beside the token stream into every later block.

A channel is a ``[B, N, 1]`` tensor with one value per row of the stream:

* ``"sizes"``: how many patches each row stands for. A sized stream function (ToMe's merge, ATS's padding)
  starts it; 0 marks padding (ATS: each image keeps its own number of rows, padding after them).
* ``"positions"``: the index of each row in the first block's input; a row that stands for several takes one
  of theirs (a ToMe merge its destination's, EViT's fused token its highest-scoring dropped token's); −1 for
  padding. Threaded only where a rewrite reads it.
* ``"keep"``: a training graph's keep policy (DynamicViT): 1 for a kept row, 0 for one dropped but not removed.
  A rewrite sets it (:func:`write_state`); from that block on every attention renormalises over the kept keys
  (:func:`~fxprune.ops.softmax_with_policy`, a multiplicative rule, not a bias).

Each channel follows every later block's stream node by the rule its graph function declares
(:mod:`fxprune.ops.registry`); a sized function carries the sizes itself. What a channel does to the
attention of later blocks is the channel's: the sizes become an additive bias (``log(size)`` with
proportional attention, −inf for padding), and in a padded batch every reduction is told the sizes so that it
reduces each image from its own rows. A channel with a multiplicative rule (a training keep mask) or
per-block query/key masks is a channel of its own, not a change of the sizes.

A rewrite reads a channel with :func:`read_state`: a call of :func:`~fxprune.ops.initial_state` (correct
when no earlier block changed the rows), which :func:`thread_state` replaces by the threaded state.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch.fx as fx

from ..analysis import (
    Block,
    TokenProgram,
    bias_per_query,
    key_rows,
    last_self_attention,
    pooled_rows,
    sdpa_arguments,
    token_pooling,
)
from ..errors import FxPruneError, UnsupportedModelError
from ..ops import (
    KEEP,
    SIZES,
    clustered_attention,
    initial_state,
    op_of,
    policy_attention,
    size_bias,
    size_weighted_mean,
    softmax_with_policy,
)
from .common import Role, graph_order, insert_call, inserted, stream_node, tag

if TYPE_CHECKING:
    from ..planning import PlanRow

__all__ = ["read_state", "write_state", "follow_state", "thread_state"]


def read_state(gm: fx.GraphModule, block: Block, channel: str) -> fx.Node:
    """A node holding ``channel`` ``[B, N, 1]`` of the rows entering ``block`` (wired by :func:`thread_state`)."""
    node = insert_call(gm, block.input, initial_state, (block.input, channel), {}, block, f"read_{channel}")
    return tag(node, block, Role.STATE, channel)


def write_state(gm: fx.GraphModule, block: Block, channel: str, node: fx.Node) -> fx.Node:
    """Make ``node`` ``channel`` ``[B, N, 1]`` of the rows leaving ``block``'s rewrite (it applies to ``block``'s
    own attention and every later one); returns it."""
    return tag(node, block, Role.STATE, channel)


def _readers(gm: fx.GraphModule, index: int, channel: str) -> list[fx.Node]:
    return [n for n in inserted(gm, index, Role.STATE) if n.target is initial_state and n.args[1] == channel]


def _written(gm: fx.GraphModule, index: int, channel: str) -> list[fx.Node]:
    return [n for n in inserted(gm, index, Role.STATE) if n.meta["fxprune"].channel == channel
            and n.target is not initial_state]


def follow_state(gm: fx.GraphModule, block: Block, stream: fx.Node, channel: str, state: fx.Node) -> fx.Node:
    """``channel`` of the rows ``stream`` gives, from ``state``, the channel of the rows it received."""
    op = op_of(stream.target)
    if channel == SIZES and op.sized:
        stream.update_arg(1, state)
        after = next(n for n in stream.users if n.target is operator.getitem) if stream.users else stream
        node = insert_call(gm, after, operator.getitem, (stream, 1), {}, block, channel)
        return tag(node, block, Role.STATE, channel)
    rule = op.follows_with(channel)
    if rule is None:
        raise FxPruneError(
            f"{stream.name} ({getattr(stream.target, '__name__', stream.target)}) declares no rule for the token "
            f"state {channel!r}: declare one with fxprune.ops.follows"
        )
    node = insert_call(gm, stream, rule, (state, *stream.args[1:]), dict(stream.kwargs), block, channel)
    return tag(node, block, Role.STATE, channel)


def _thread_sizes(gm: fx.GraphModule, program: TokenProgram, rows: Sequence[PlanRow], restored: bool) -> None:
    """Route the sizes from the first sized stream (or, where a rewrite reads them, from the first block) through
    every later block (see the module docstring); with the layout ``restored`` after the last block of
    self-attention, an attention pool or mean after it reads every original token once, and takes no sizes."""
    read = any(_readers(gm, row.index, SIZES) for row in rows)
    size: fx.Node | None = read_state(gm, program.blocks[0], SIZES) if read else None
    proportional = padded = False
    order = graph_order(gm)
    last = last_self_attention(program.blocks).index
    for row in rows:
        block = program.blocks[row.index]
        if restored and row.index > last:
            break
        stream = stream_node(gm, row.index) if row.method is not None else None
        before = stream is not None and order(stream) < order(block.attention.node)  # reduces the block's input
        for reader in _readers(gm, row.index, SIZES):
            if size is not None and reader is not size:
                reader.replace_all_uses_with(size)
        if padded:
            for node in inserted(gm, row.index):
                op = op_of(node.target)
                if op is not None and op.padding is not None:
                    node.update_kwarg(op.padding, True if op.sized else size)
        if size is not None and (proportional or padded) and not before:
            _add_size_bias(gm, block, _at_keys(gm, program, block, size), proportional)
        if stream is None:
            continue
        if op_of(stream.target).sized:
            size = follow_state(gm, block, stream, SIZES, size)
            if row.method.proportional is not None:
                proportional = row.method.proportional(row.policy)
            padded = padded or row.method.pads_tokens
        elif size is not None:
            size = follow_state(gm, block, stream, SIZES, size)
        if size is not None and (proportional or padded) and before:
            _add_size_bias(gm, block, size, proportional)
    if size is not None and not restored:
        _pool_by_size(gm, program, size)


def _at_keys(gm: fx.GraphModule, program: TokenProgram, block: Block, state: fx.Node) -> fx.Node:
    """``state`` ``[B, N, 1]`` of the stream's rows, at the rows ``block``'s attention keys are computed from:
    ``state`` itself, or for an attention pool over some rows of the final tokens (``kv(x[:, P:])``) those rows."""
    rows = None if block.tokens else key_rows(program, block)
    if rows is None or rows == slice(None):
        return state
    return insert_call(gm, block.attention.node.prev, operator.getitem, (state, (slice(None), rows)), {}, block,
                       "key_rows")


def _pool_by_size(gm: fx.GraphModule, program: TokenProgram, size: fx.Node) -> None:
    """Make a mean over the final tokens' rows (a mean-pooled model's head) weight each row by its size, which
    leaves padding out and counts a merged row for the patches it stands for."""
    pool = token_pooling(program)
    pooled = None if pool is None else pooled_rows(program, pool)
    if pooled is None:
        return
    keepdim = pool.kwargs.get("keepdim", pool.args[2] if len(pool.args) > 2 else False)
    with gm.graph.inserting_before(pool):  # outside every block: its MACs count outside blocks
        rows = size if pooled[1] == slice(None) else gm.graph.call_function(
            operator.getitem, (size, (slice(None), pooled[1])))
        node = gm.graph.call_function(size_weighted_mean, (pool.args[0], rows), {"keepdim": keepdim})
    node.meta["nn_module_stack"] = dict(pool.meta.get("nn_module_stack") or {})
    pool.replace_all_uses_with(node)
    gm.graph.erase_node(pool)


def _thread(gm: fx.GraphModule, program: TokenProgram, rows: Sequence[PlanRow], channel: str) -> None:
    """Route ``channel`` from the model's first block through every stream to the rewrites that read it."""
    state: fx.Node | None = None
    for row in rows:
        block = program.blocks[row.index]
        for reader in _readers(gm, row.index, channel):
            if state is None:  # no earlier block changed the rows: the reader's own initial state is right
                state = reader
            else:
                reader.replace_all_uses_with(state)
        stream = stream_node(gm, row.index) if row.method is not None else None
        if stream is not None:
            start = read_state(gm, program.blocks[0], channel) if state is None else state  # rows as the model had them
            state = follow_state(gm, block, stream, channel, start)


def _thread_keep(gm: fx.GraphModule, program: TokenProgram, rows: Sequence[PlanRow]) -> None:
    """Route the keep policy from the first block that sets it through every later block, each attention
    renormalising over the kept keys."""
    policy: fx.Node | None = None
    for row in rows:
        block = program.blocks[row.index]
        for reader in _readers(gm, row.index, KEEP):
            if policy is not None:
                reader.replace_all_uses_with(policy)
        policy = next(reversed(_written(gm, row.index, KEEP)), policy)
        if policy is not None:
            _attend_with_policy(gm, block, _at_keys(gm, program, block, policy))


def thread_state(gm: fx.GraphModule, program: TokenProgram, rows: Sequence[PlanRow], restored: bool = False) -> None:
    """Thread every channel that is started, set or read in ``gm`` through the blocks of the plan ``rows`` (run
    after every block rewrite): the sizes when a sized stream starts them, the keep policy where a rewrite sets
    it, any other channel a rewrite reads. ``restored``: the original token layout is put back after the last block
    of self-attention (:func:`~fxprune.passes.restore.restores_layout`)."""
    streams = [stream_node(gm, row.index) for row in rows if row.method is not None]
    if any(node is not None and op_of(node.target).sized for node in streams) or any(
        _readers(gm, row.index, SIZES) for row in rows
    ):
        _thread_sizes(gm, program, rows, restored)
    if any(_written(gm, row.index, KEEP) or _readers(gm, row.index, KEEP) for row in rows):
        _thread_keep(gm, program, rows)
    read = {n.args[1] for n in gm.graph.nodes if n.target is initial_state and n.args[1] not in (SIZES, KEEP)}
    for channel in sorted(read):
        _thread(gm, program, rows, channel)


def _attend_with_policy(gm: fx.GraphModule, block: Block, policy: fx.Node) -> None:
    """Make ``block``'s attention renormalise over the keys ``policy`` ``[B, N, 1]`` keeps: its SDPA call becomes
    :func:`~fxprune.ops.policy_attention`, an explicit softmax :func:`~fxprune.ops.softmax_with_policy`."""
    site = block.attention
    if site.node not in gm.graph.find_nodes(op=site.node.op, target=site.node.target):
        raise UnsupportedModelError(
            f"block {block.index} ({block.name}): its rewrite replaced the attention call, which a keep policy set "
            "by an earlier block must renormalise; such a method declares keeps_attention=False, and the plan then "
            "refuses it after the block that sets the policy"
        )
    if site.kind == "sdpa":
        args = sdpa_arguments(site.node)
        if args["is_causal"] is not False:
            raise UnsupportedModelError(
                f"block {block.index} ({block.name}) has causal attention, which a keep policy cannot mask"
            )
        kwargs = {name: args[name] for name in ("attn_mask", "dropout_p", "scale")}
        qkv = (args["query"], args["key"], args["value"])  # as the call reads them now (AdaViT gates its heads)
        node = insert_call(gm, site.node, policy_attention, (*qkv, policy), kwargs, block, "kept_attention",
                           Role.ATTENTION)
        site.node.replace_all_uses_with(node)
        gm.graph.erase_node(site.node)
        return
    logits = site.node.args[0]
    node = insert_call(gm, site.node, softmax_with_policy, (logits, policy), {}, block, "kept_softmax", Role.ATTENTION)
    site.node.replace_all_uses_with(node)
    gm.graph.erase_node(site.node)


def _add_size_bias(gm: fx.GraphModule, block: Block, size: fx.Node, proportional: bool) -> None:
    """Add ``log(size)`` of the keys (not ``proportional``: only −inf for padding, size 0) to ``block``'s
    attention logits: as (part of) the attention mask of the SDPA call, of the nodes that read that mask
    beside it (scores, ClusTR's clustering, which turns it into key weights, and which takes the sizes alone as its
    ``key_mask`` when the block has a mask of its own), or onto the logits of an explicit softmax."""
    site = block.attention
    readers = [n for n in inserted(gm, block.index) if getattr(op_of(n.target), "reads_mask", False)]
    if site.kind == "sdpa" and not any(n.target is clustered_attention for n in readers):
        readers.append(site.node)
    if not readers:
        logits = site.node.args[0]
        bias = insert_call(gm, logits, size_bias, (size, None, logits, proportional), {}, block, "size_bias", Role.BIAS)
        biased = insert_call(gm, bias, operator.add, (logits, bias), {}, block, "biased_logits")
        site.node.replace_input_with(logits, biased)
        return
    biases: dict[fx.Node | None, fx.Node] = {}  # one per mask: the SDPA call may read its kept queries' rows only
    bias = None
    for node in (n for n in gm.graph.nodes if n in readers):
        mask = sdpa_arguments(node)["attn_mask"] if node is site.node else node.kwargs.get("attn_mask")
        if mask not in biases:
            biases[mask] = insert_call(gm, node.prev, size_bias, (size, mask, site.q, proportional), {}, block,
                                       "size_bias", Role.BIAS)
        bias = biases[mask]
        if node is site.node and len(node.args) > 3:
            node.update_arg(3, bias)
        else:
            node.update_kwarg("attn_mask", bias)
    clustering = [n for n in readers if n.target is clustered_attention]
    if clustering and bias_per_query(site):  # the sizes alone weight its keys where the mask differs per query
        sizes = insert_call(gm, bias, size_bias, (size, None, site.q, proportional), {}, block, "key_mask", Role.BIAS)
        for node in clustering:
            node.update_kwarg("key_mask", sizes)

