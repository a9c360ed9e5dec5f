"""Graph surgery shared by the block rewrites: inserting nodes for a block, tagging them, rerouting the stream.

Every node a rewrite inserts carries a :class:`Tag` in ``node.meta["fxprune"]``: the block it belongs to and its
:class:`Role`. One node per reducing block has the role ``STREAM``: the node whose value (or, for a pair, its
first element) is the block's new token stream. Plan, verify, ``show`` and token-state threading read that tag;
the graph function the node calls declares how token state follows it (:mod:`fxprune.ops.registry`).
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from ..analysis import Block, TokenProgram, ancestors, descendants, reachable, sdpa_arguments
from ..capture.tracer import fetch_attr
from ..ops import (
    class_attention,
    class_attention_from_probs,
    gather_mask_rows,
    gather_queries,
    gather_tokens,
    op_of,
    received_attention,
    received_attention_from_probs,
)

_RESHAPES = ("reshape", "view")


class Role(enum.Enum):
    """What an inserted node is to the rest of fxprune."""

    STREAM = "stream"  # carries the block's new token stream ``[B, N', C]`` (of a pair: element 0)
    ROWS = "rows"  # the rows the block keeps ``[B, K]``
    STATE = "state"  # a token-state channel ``[B, N, 1]`` beside the stream (``Tag.channel`` names it)
    SCORE = "score"  # token scores, e.g. the class-attention row ``[B, N]``
    BIAS = "bias"  # an additive attention bias made from token state
    ATTENTION = "attention"  # an attention computed another way (ClusTR)
    MODULE = "module"  # a call of a learned submodule the rewrite added
    AUX = "aux"  # anything else: indexing, shape reads, intermediate values


@dataclasses.dataclass(frozen=True)
class Tag:
    """``node.meta["fxprune"]`` of an inserted node: its block, its role and (state) its channel."""

    block: int
    role: Role
    channel: str | None = None


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """What a block rewrite did: ``stream``, the node carrying the block's new token stream (None: the token
    rows are unchanged, e.g. ClusTR), and ``rows``, the rows it keeps ``[B, K]`` where it has them."""

    stream: fx.Node | None = None
    rows: fx.Node | None = None


def _changes_an_argument(node: fx.Node) -> bool:
    """Whether ``node`` calls an in-place method or function (``x.div_(p)``, ``torch.relu_(x)``): one whose result
    nothing reads may have changed a tensor that something does."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and isinstance(name, str) and name.endswith("_") \
        and not name.endswith("__")


def remove_dead_code(graph: fx.Graph) -> None:
    """Remove the nodes of ``graph`` whose values nothing uses, as ``fx.Graph.eliminate_dead_code`` does, but for
    in-place calls, which it removes too: timm's drop path scales its random mask in place
    (``mask.div_(keep_prob)``) and reads the mask, not the call's result."""
    graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure() or _changes_an_argument(node))


def tag_of(node: fx.Node) -> Tag | None:
    """The tag of a node fxprune inserted, else None."""
    return node.meta.get("fxprune")


def tag(node: fx.Node, block: Block | int, role: Role, channel: str | None = None) -> fx.Node:
    """Tag ``node`` as fxprune's node ``role`` of ``block``; returns it."""
    node.meta["fxprune"] = Tag(block if isinstance(block, int) else block.index, role, channel)
    return node


def inserted(gm: fx.GraphModule, index: int, role: Role | None = None) -> list[fx.Node]:
    """The nodes inserted for block ``index`` (only those of ``role`` when given), in graph order."""
    return [n for n in gm.graph.nodes if (t := tag_of(n)) is not None and t.block == index and role in (None, t.role)]


def stream_node(gm: fx.GraphModule, index: int) -> fx.Node | None:
    """The node carrying block ``index``'s new token stream, or None when its token rows are unchanged."""
    return next(iter(inserted(gm, index, Role.STREAM)), None)


def stream_tokens(stream: fx.Node) -> fx.Node:
    """The tokens that the stream node ``stream`` (a block's rewrite) passes on: the node itself, or the item 0 it
    is read at when its function is sized (``(tokens, sizes)``, see :func:`reroute_stream`)."""
    if not getattr(op_of(stream.target), "sized", False):
        return stream
    return next(user for user in stream.users if user.target is operator.getitem and user.args[1] == 0)


def insert_call(
    gm: fx.GraphModule,
    after: fx.Node,
    fn: Callable | str,
    args: tuple,
    kwargs: dict[str, Any],
    block: Block,
    name: str,
    role: Role = Role.AUX,
    op: str = "call_function",
) -> fx.Node:
    """Insert ``fn(*args, **kwargs)`` (``op="call_method"``: the method named ``fn`` of ``args[0]``) after
    ``after``, named for ``block`` and ``name`` and tagged with ``role``."""
    with gm.graph.inserting_after(after):
        node = gm.graph.create_node(op, fn, args, kwargs, name=f"{block.name.replace('.', '_')}_{name}")
    node.meta["nn_module_stack"] = dict(block.mid.meta.get("nn_module_stack") or {})
    return tag(node, block, role)


def model_tokens(gm: fx.GraphModule, program: TokenProgram) -> fx.Node:
    """A node reading the number of tokens entering the model's first block (``N`` of its ``[B, N, C]``
    input), inserted once and shared."""
    first = program.blocks[0].input
    existing = [n for n in first.users if _is_model_tokens(n)]
    if existing:
        return existing[0]
    return insert_call(gm, first, "size", (first, 1), {}, program.blocks[0], "model_tokens", op="call_method")


def _is_model_tokens(node: fx.Node) -> bool:
    """Whether ``node`` is the shared read of :func:`model_tokens` (an inserted node, but no block's rewrite)."""
    return node.name.endswith("_model_tokens") and tag_of(node) is not None


def rewritten_blocks(gm: fx.GraphModule) -> dict[int, set[Role]]:
    """The blocks of ``gm`` that an fxprune transform rewrote, with the roles of the nodes it inserted there (in the
    numbering of the model it rewrote): not the blocks that only take state an earlier block threads to them (a size
    bias, a state channel), nor the shared :func:`model_tokens` read."""
    found: dict[int, set[Role]] = {}
    for node in gm.graph.nodes:
        found_tag = tag_of(node)
        if found_tag is not None and found_tag.role not in (Role.BIAS, Role.STATE) and not _is_model_tokens(node):
            found.setdefault(found_tag.block, set()).add(found_tag.role)
    return found


def token_scores(gm: fx.GraphModule, block: Block, class_token: bool, before: bool = False) -> fx.Node:
    """Insert the token scores ``[B, N]`` of ``block``'s attention beside it: the head-averaged class-attention row
    when the model has a class token, else the attention each token receives (``fxprune.analysis.SCORES`` names
    them), computed ``before`` the SDPA call for a pass that changes its inputs (SDPA sites only)."""
    site, name = block.attention, "class_attn" if class_token else "received_attn"
    if site.kind == "sdpa":
        args = sdpa_arguments(site.node)
        kwargs = {"scale": args["scale"], "attn_mask": args["attn_mask"]}
        after = site.node.prev if before else site.node
        fn = class_attention if class_token else received_attention
        return insert_call(gm, after, fn, (site.q, site.k), kwargs, block, name, Role.SCORE)
    fn = class_attention_from_probs if class_token else received_attention_from_probs
    return insert_call(gm, site.node, fn, (site.node,), {}, block, name, Role.SCORE)


def reroute_stream(
    gm: fx.GraphModule, block: Block, fn: Callable, args: tuple, name: str, kwargs: dict[str, Any] | None = None,
    source: fx.Node | None = None, at: fx.Node | None = None,
) -> fx.Node:
    """Insert ``fn(source, *args, **kwargs)`` after its last input and make every later use of the stream node
    ``at`` use its result: ``at`` is ``block.mid`` (after the block's attention) unless given (``block.input``:
    before it), ``source`` is ``at`` unless given (a node computed from it). A sized stream function
    (``(tokens, sizes)``; its sizes argument, None here, is wired by :func:`fxprune.passes.state.thread_state`)
    is rerouted through its tokens. Returns the inserted call."""
    mid = block.mid if at is None else at
    source = mid if source is None else source
    kwargs = kwargs or {}
    sized = getattr(op_of(fn), "sized", False)
    args = (source, None, *args) if sized else (source, *args)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max(_nodes_in((args, kwargs)), key=order.__getitem__)
    node = insert_call(gm, last, fn, args, kwargs, block, name)
    tokens = insert_call(gm, node, operator.getitem, (node, 0), {}, block, f"{name}_tokens") if sized else node
    mid.replace_all_uses_with(tokens, delete_user_cb=lambda user: order.get(user, -1) > order[last])
    return node


def _nodes_in(value: Any) -> list[fx.Node]:
    """The graph nodes in a nested argument structure."""
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


def graph_order(gm: fx.GraphModule) -> Callable[[fx.Node], int]:
    """Each node's position in ``gm``'s graph as it is now (a sort key: ``max(a, b, key=graph_order(gm))`` is the
    later of two nodes, after which a node reading both can be inserted)."""
    return {node: i for i, node in enumerate(gm.graph.nodes)}.__getitem__


def _mask_shape(mask: object) -> tuple[int, ...] | None:
    """The shape of an attention mask node's example value; None when it has none (not known)."""
    if not isinstance(mask, fx.Node):
        return None
    return tuple(getattr(mask.meta.get("val"), "shape", ())) or None


def can_select_queries(block: Block) -> bool:
    """Whether ``block``'s attention is an SDPA call whose mask (if any) is known, so that a selection known
    before it can attend with the kept queries only (a mask with per-query rows, such as a relative position
    bias, then gives the kept queries' rows); not in a parallel block, whose other branch reads every row."""
    site = block.attention
    if site.kind != "sdpa" or block.parallel is not None:
        return False
    mask = sdpa_arguments(site.node)["attn_mask"]
    return mask is None or _mask_shape(mask) is not None


def select_queries(gm: fx.GraphModule, block: Block, rows: fx.Node) -> fx.Node:
    """Keep the token rows ``rows`` ``[B, K]`` inside ``block``'s attention (see :func:`can_select_queries`):
    only those queries attend (keys and values stay all ``N``), with their rows of a mask that has per-query
    rows; the output projection runs on ``K`` rows and the residual add gathers the same rows. Same outputs as
    selecting after the add, fewer MACs. Returns the residual's row gather, whose output ``[B, K, C]`` is the
    block's new token stream."""
    site = block.attention
    queries = insert_call(gm, rows, gather_queries, (site.q, rows), {}, block, "kept_queries")
    site.node.replace_input_with(site.q, queries)
    mask = sdpa_arguments(site.node)["attn_mask"]
    shape = _mask_shape(mask)
    if shape is not None and len(shape) >= 2 and shape[-2] > 1:  # per-query rows: the kept queries' own
        after = max(mask, queries, key=graph_order(gm))
        kept_mask = insert_call(gm, after, gather_mask_rows, (mask, rows), {}, block, "kept_mask_rows")
        site.node.replace_input_with(mask, kept_mask)
    with gm.graph.inserting_after(queries):
        kept = gm.graph.call_method("size", (queries, 2))
    _resize_token_axis(gm, site.node, block.mid, block.tokens, kept)
    residual = insert_call(gm, block.mid.prev, gather_tokens, (block.input, rows), {}, block, "kept_residual")
    block.mid.replace_input_with(block.input, residual)
    return residual


def computed_from_inputs(gm: fx.GraphModule) -> set[fx.Node]:
    """The inputs of ``gm``'s graph and every node computed from them; the others are computed from parameters and
    constants only."""
    return reachable(gm.graph.find_nodes(op="placeholder"), lambda node: node.users)


def attribute(gm: fx.GraphModule, node: fx.Node) -> object:
    """The value the ``get_attr`` node ``node`` reads from ``gm``; None for any other node."""
    return fetch_attr(gm, node.target) if node.op == "get_attr" else None


def between(gm: fx.GraphModule, start: fx.Node, stop: fx.Node) -> list[fx.Node]:
    """The nodes computed from ``start`` on the way to ``stop`` (``stop`` included, ``start`` not), in graph
    order."""
    inside = descendants(start) & ancestors([stop])
    return [node for node in gm.graph.nodes if node in inside]


def _resize_token_axis(gm: fx.GraphModule, start: fx.Node, stop: fx.Node, tokens: int, kept: fx.Node) -> None:
    """Make the reshapes between the attention ``start`` and ``stop`` that use a token count fixed before
    the attention (a shape read or a literal equal to ``tokens``) use ``kept`` (the kept queries)."""
    downstream = reachable([start], lambda node: node.users, stop)
    for node in downstream:
        shape = reshape_sizes(node)
        if shape is None:
            continue
        resized = [kept if _read_before(size, downstream) == tokens and not _reads_batch_or_channels(size) else size
                   for size in shape]
        if resized != shape:
            packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
            node.args = (node.args[0], tuple(resized)) if packed else (node.args[0], *resized)


def reshape_sizes(node: fx.Node) -> list[Any] | None:
    """The sizes ``node`` gives its output when it is ``x.view(*sizes)`` or ``x.reshape(*sizes)`` (sizes passed
    one by one or as a tuple: ints, ``-1`` or nodes); None for any other node."""
    if node.op != "call_method" or node.target not in _RESHAPES:
        return None
    packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
    return list(node.args[1]) if packed else list(node.args[1:])


def axis_read(size: object) -> tuple[int, int] | None:
    """``(axis, dims)`` where ``size`` reads axis ``axis`` (counted from 0) of the shape of a tensor of ``dims`` axes
    (``x.shape[1]``, ``x.size(-1)``, ``x.shape[:-1][i]``), else None (a literal, or any other value)."""
    if not isinstance(size, fx.Node) or size.op not in ("call_function", "call_method"):
        return None
    if size.op == "call_method" and size.target == "size" and len(size.args) == 2:
        tensor, axes = size.args[0], None
        axis = size.args[1]
    elif size.target is operator.getitem and isinstance(size.args[0], fx.Node):
        shape, axis = size.args
        axes = None
        if shape.target is operator.getitem and isinstance(shape.args[1], slice):  # x.shape[:-1][i]
            shape, axes = shape.args[0], shape.args[1]
        if not (isinstance(shape, fx.Node) and shape.target is getattr and shape.args[1] == "shape"):
            return None
        tensor = shape.args[0]
    else:
        return None
    value = tensor.meta.get("val") if isinstance(tensor, fx.Node) else None
    if not isinstance(value, torch.Tensor) or not isinstance(axis, int):
        return None
    dims = range(value.dim())
    dims = dims if axes is None else dims[axes]
    return (dims[axis], value.dim()) if -len(dims) <= axis < len(dims) else None


def _reads_batch_or_channels(size: object) -> bool:
    """Whether ``size`` reads the first or the last axis of a tensor's shape (``x.shape[0]``, ``v.shape[-1]``,
    ``x.size(2)`` of ``[B, N, C]``): the batch, channels or a head's size, never the token count, though it may equal
    it (a batch of as many images as there are tokens)."""
    read = axis_read(size)
    return read is not None and read[0] in (0, read[1] - 1)


def _read_before(size: object, downstream: set[fx.Node]) -> object:
    """The value of a reshape's ``size`` argument when it was fixed before the attention, else None."""
    if isinstance(size, fx.Node):
        return None if size in downstream else size.meta.get("val")
    return size
