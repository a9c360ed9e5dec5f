"""Analysis: find the attention sites, the token stream, the blocks and the prefix tokens of a graph.

The token stream is found with dominators: a node through which every path from the input to the
output passes is a safe place to change the number of tokens, and the ``[B, N, C]``-shaped ones form
the stream. Each global self-attention site on the stream defines one *block*: the stream node that
enters it (``input``) and the stream node right after its residual addition (``mid``, where token
selection goes, between attention and MLP).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .capture import ExampleInputs, TraceInfo, trace
from .errors import UnsupportedModelError
from .ops import op_of
from .ops.clustering import holds_one_value_per_key
from .readout import Readout, data_nodes, is_shape_read, readout

__all__ = [
    "AttentionSite", "Block", "PositionTerm", "TokenProgram", "SCORES", "analyse", "mixes_heads", "module_path",
    "op_name", "sdpa_arguments", "SDPA_TARGETS",
]

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_SOFTMAX_FUNCTIONS = (F.softmax, torch.softmax, torch.Tensor.softmax)
_MATMUL_FUNCTIONS = (operator.matmul, torch.matmul, torch.bmm)
_MATMUL_METHODS = ("matmul", "bmm", "__matmul__")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_WEIGHT_CONSUMERS = (F.linear, F.layer_norm, F.group_norm, F.conv2d, F.conv1d, torch._C._nn.linear)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


SCORES = {  # the token score of EViT, Top-K and ATS, by whether the model has a class token
    True: "class-token attention (row 0)",
    False: "attention received, averaged over queries and heads",
}


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One attention computation in the graph.

    ``node`` is the ``scaled_dot_product_attention`` call (``kind='sdpa'``) or the softmax of an explicit
    ``softmax(q @ kᵀ) @ v`` (``kind='softmax'``); ``q``/``k``/``v`` are ``[B, H, N, d]`` nodes; ``output``
    is the ``[B, H, Nq, d]`` result.
    """

    node: fx.Node
    kind: str
    module: str
    q: fx.Node
    k: fx.Node | None
    v: fx.Node
    output: fx.Node
    num_heads: int
    head_dim: int
    batch: int
    queries: int
    keys: int
    scale: float | None = None
    mask: fx.Node | None = None


@dataclasses.dataclass(frozen=True)
class PositionTerm:
    """A tensor built without the input's values and laid out per token position (a relative position bias, a
    rotary table), read by a block's attention: ``node``, the data nodes that read it (``readers``), its token
    ``axes`` and whether they count the patches only (``patches_only``, after the prefix tokens) or every token.
    ``axes`` is empty when they cannot be told apart from other axes of the same size."""

    node: fx.Node
    readers: tuple[fx.Node, ...]
    axes: tuple[int, ...]
    patches_only: bool

    def __str__(self) -> str:
        name = self.node.target if self.node.op == "get_attr" else self.node.name
        return f"{name} {list(_shape(self.node) or ())}"


ReadsApart = tuple[tuple[fx.Node, fx.Node], ...]


@dataclasses.dataclass(frozen=True)
class Block:
    """A transformer block on the token stream, anchored on its attention site.

    ``input`` is the stream node entering the block, ``mid`` the residual add after its attention (where a
    selection goes; in a parallel block, the add after both its branches), ``tokens`` the tokens entering it,
    ``position_terms`` the constant tables laid out per token position that its attention logits read (relative
    position bias, rotary tables). ``refusal`` says why its tokens cannot be reduced (None: they can);
    ``needs_all_tokens`` is set when the block would also compute wrong numbers if an *earlier* block reduced tokens
    (windowed attention, position tables laid out for every token, a stream that is not a token sequence), which
    the plan checks for every block after the first reducing one. ``parallel`` starts a branch that reads the block
    input beside the attention and meets it at ``mid`` (a parallel block: its MLP beside its attention; the branch's
    first module call, else its first node), None in a block that runs them one after the other.
    """

    index: int
    name: str
    attention: AttentionSite
    input: fx.Node
    mid: fx.Node | None
    tokens: int
    refusal: str | None = None
    needs_all_tokens: bool = False
    position_terms: tuple[PositionTerm, ...] = ()
    parallel: fx.Node | None = None

    @property
    def reducible(self) -> bool:
        """Whether tokens can be selected in this block."""
        return self.refusal is None

    @property
    def beside(self) -> str:
        """The module (else the node) that starts the branch beside the attention of a parallel block; ''."""
        node = self.parallel
        return "" if node is None else node.target if node.op == "call_module" else node.name


@dataclasses.dataclass(frozen=True)
class TokenProgram:
    """What the passes need to know about a captured model."""

    gm: fx.GraphModule
    blocks: tuple[Block, ...]
    prefix_tokens: int
    class_token: bool
    tokens: int
    dim: int
    batch: int
    stream: list[fx.Node]
    trace: TraceInfo
    model_name: str
    unrecognised: list[str] = dataclasses.field(default_factory=list)  # attention-like parts left as they are
    readout: Readout = Readout(why="not analysed")
    reads_apart: ReadsApart = ()  # (stream value, reader): intermediate blocks' tokens read beside the stream

    def __str__(self) -> str:
        head = (
            f"{self.model_name}: {len(self.blocks)} attention blocks, {self.tokens} tokens × {self.dim} channels "
            f"({self.prefix_tokens} prefix token(s), class token: {'yes' if self.class_token else 'no'})"
        )
        lines = [head, str(self.trace), f"  readout: {self.readout}"]
        if self.reads_apart:
            readers = ", ".join(dict.fromkeys(module_path(reader) or reader.name for _, reader in self.reads_apart))
            lines.append(f"  read apart from the stream: {len(self.reads_apart)} value(s) of intermediate blocks, by "
                         f"{readers} (each gets the original token layout where it is read)")
        lines.extend(f"  not recognised as attention (left as is): {u}" for u in self.unrecognised)
        lines.append(f"  token scores (EViT, Top-K, ATS): {SCORES[self.class_token]}")
        lines.append(f"  {'#':>3}  {'block':<36} {'attention':<10} {'heads':>5} {'tokens':>6}  {'position terms':<16}  "
                     "status")
        for b in self.blocks:
            status = "reducible" if b.reducible else f"not reducible: {b.refusal}"
            status += " (parallel block: after both branches)" if b.reducible and b.parallel is not None else ""
            names = [str(t).split(" ")[0] for t in b.position_terms]
            terms = (names[0] + (f" +{len(names) - 1}" if len(names) > 1 else "")) if names else "none"
            lines.append(
                f"  {b.index:>3}  {b.name:<36} {b.attention.kind:<10} {b.attention.num_heads:>5} {b.tokens:>6}"
                f"  {terms:<16}  {status}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Attention sites


def sdpa_arguments(node: fx.Node) -> dict[str, Any]:
    """The arguments of a ``scaled_dot_product_attention`` node by parameter name (defaults filled in)."""
    values: dict[str, Any] = {
        "attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False
    }
    values.update(zip(_SDPA_PARAMS, node.args))
    values.update(node.kwargs)
    return values


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def _shape(node: Any) -> tuple[int, ...] | None:
    val = _val(node)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _is_softmax(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS:
        return True
    if node.op == "call_method" and node.target == "softmax":
        return True
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Softmax)


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in _MATMUL_METHODS
    )


def _passes_through(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` can sit between ``q @ kᵀ``, softmax and ``@ v``: dropout, an op that keeps the
    ``[B, H, N, N]`` shape of its first tensor input (scaling, masking, bias, dtype casts), or, for talking-heads
    attention (CaiT), a permutation of its axes or a linear layer that mixes the heads."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Dropout):
            return True
        if not isinstance(module, nn.Linear) or module.in_features != module.out_features:
            return False
    source = _tensor_input(node)
    shape, before = _shape(node), _shape(source)
    return source is not None and shape is not None and before is not None and sorted(shape) == sorted(before)


def mixes_heads(site: AttentionSite) -> fx.Node | None:
    """The first node that mixes the heads of ``site``'s logits or probabilities (talking-heads attention: a linear
    layer across heads before or after the softmax), or None."""
    if site.kind != "softmax":
        return None
    gm = site.node.graph.owning_module
    probs = []
    node = site.node
    while node is not site.output:
        node = next(user for user in node.users if user is site.output or _passes_through(user, gm))
        probs.append(node)
    for node in [*logits_path(site)[1:], *probs[:-1]]:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Linear):
            return node
    return None


def _tensor_input(node: fx.Node) -> fx.Node | None:
    """The first tensor-valued node argument of ``node``."""
    for arg in node.args:
        if isinstance(arg, fx.Node) and isinstance(_val(arg), torch.Tensor):
            return arg
    return None


def _untranspose(node: fx.Node) -> fx.Node | None:
    """``k`` when ``node`` is ``k.transpose(-2, -1)`` (or an equivalent), else None."""
    if node.op == "call_method" and node.target in ("transpose", "mT", "permute"):
        return node.args[0]
    transposes = ((-2, -1), (2, 3), ("mT",))
    if node.op == "call_function" and node.target in (torch.transpose, getattr) and node.args[1:] in transposes:
        return node.args[0]
    return None


def _explicit_site(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node] | None:
    """(q, kᵀ, v, output) of an explicit ``softmax(q @ kᵀ) @ v`` anchored on the softmax ``node``."""
    scores = _tensor_input(node)
    while scores is not None and not _is_matmul(scores) and _passes_through(scores, gm):
        scores = _tensor_input(scores)
    if scores is None or not _is_matmul(scores):
        return None
    probs_users = list(node.users)
    while len(probs_users) == 1 and not _is_matmul(probs_users[0]) and _passes_through(probs_users[0], gm):
        probs_users = list(probs_users[0].users)  # (`@ v` keeps the shape where a head has as many channels as rows)
    for user in probs_users:
        if _is_matmul(user) and isinstance(user.args[1], fx.Node):
            return scores.args[0], scores.args[1], user.args[1], user
    return None


def logits_path(site: AttentionSite) -> list[fx.Node]:
    """For an explicit site: the nodes from ``q @ kᵀ`` (first) to the softmax's input (last)."""
    path = [_tensor_input(site.node)]
    while not _is_matmul(path[-1]):
        path.append(_tensor_input(path[-1]))
    return path[::-1]


def _scalar(value: Any) -> bool:
    val = _val(value)
    return not isinstance(val, torch.Tensor) or val.dim() == 0


def bias_per_query(site: AttentionSite) -> bool:
    """Whether ``site`` is an SDPA call whose ``attn_mask`` differs per query or head (a relative position bias)."""
    if site.kind != "sdpa":
        return False
    mask = _val(sdpa_arguments(site.node)["attn_mask"])
    return isinstance(mask, torch.Tensor) and not holds_one_value_per_key(mask)


def regrouped_keys_refusal(site: AttentionSite) -> str | None:
    """Why ``site``'s keys cannot be regrouped (clusters) and still attended as they are, or None: its logits
    must be ``q·k`` plus an additive mask that a fused SDPA call takes as its ``attn_mask`` (any shape: a
    relative position bias per query and head too) or, for an explicit softmax, at most one bias per key; each
    head's probabilities applied to its own values; not causal."""
    if (mixing := mixes_heads(site)) is not None:
        return f"it mixes its heads' attention maps ({mixing.name}: talking-heads attention)"
    if site.kind == "sdpa":
        if sdpa_arguments(site.node)["is_causal"] is not False:
            return "its attention is causal (is_causal=True)"
        return None
    for node in logits_path(site)[1:]:
        extra = [a for a in node.all_input_nodes if a not in (_tensor_input(node),) and not _scalar(a)]
        if extra:
            return (
                f"its logits read {extra[0].name} {list(_shape(extra[0]) or ())} (a mask or bias) between q @ kᵀ and "
                f"the softmax {site.node.name} (clustering takes a bias per query only through "
                f"scaled_dot_product_attention's attn_mask)"
            )
    return None


def module_path(node: fx.Node) -> str:
    """Qualified name of the innermost module ``node`` was traced in (``''`` for the top-level forward)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack)) if stack else ""


_ATTENTION_PARTS = {"qkv", "qk", "q", "k", "v", "query", "key", "value", "attn", "attention"}


def _holds_attention(module: nn.Module) -> bool:
    """Whether ``module`` holds what looks like attention: a module of a class named for it (``…Attention``,
    ``…Attn``, ``nn.MultiheadAttention``) or a part named as attention's are (``qkv``, ``qk``, ``v``, ``query``…)."""
    for path, inner in module.named_modules():
        name = type(inner).__name__.lower()
        if isinstance(inner, nn.MultiheadAttention) or "attn" in name or "attention" in name \
                or path.rpartition(".")[2] in _ATTENTION_PARTS:
            return True
    return False


def _kept_whole(gm: fx.GraphModule, info: TraceInfo) -> list[str]:
    """The modules ``gm`` calls without tracing into them from the start (timm's untraceable modules, registered
    leaves; not those made leaves when tracing them failed, ``info.leaves``) that hold what looks like attention
    (:func:`_holds_attention`), and the functions it calls whole that are named for it (torchvision's
    ``shifted_window_attention``, which it marks for fx to keep whole): attention the analysis cannot see."""
    failed = {name for name, _ in info.leaves}
    kept = []
    for node in gm.graph.find_nodes(op="call_module"):
        module = gm.get_submodule(node.target)
        if node.target not in failed and _holds_attention(module):
            kept.append(f"{node.target} ({type(module).__name__})")
    functions = dict.fromkeys(node.target for node in gm.graph.nodes
                              if node.op == "call_function" and _named_attention(node.target))
    kept += [f"{function.__module__}.{function.__name__} (a function called whole)" for function in functions]
    return kept


def _named_attention(function: Callable) -> bool:
    """Whether ``function``, called by a graph, is named for attention and is neither SDPA nor one of fxprune's."""
    name = getattr(function, "__name__", "").lower()
    return ("attn" in name or "attention" in name) and function not in SDPA_TARGETS and op_of(function) is None


def find_attention(gm: fx.GraphModule) -> tuple[list[AttentionSite], list[str]]:
    """Every SDPA call and explicit ``softmax(q @ kᵀ) @ v`` of ``gm`` with a ``[B, H, N, d]`` query, and a
    description of each SDPA call with another query layout and of each softmax over a square map that does not fit
    that pattern."""
    sites, unrecognised = [], []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            args = sdpa_arguments(node)
            q, k, v = args["query"], args["key"], args["value"]
            site = _make_site(node, "sdpa", q, k, v, node, args["scale"], args["attn_mask"])
            if site is None:
                shape = _shape(q)
                unrecognised.append(
                    f"attention {node.name} on queries {list(shape) if shape else 'of unknown shape'} in "
                    f"{module_path(node) or 'forward'} (not [B, H, N, d]: attention within windows or groups, or "
                    "heads folded into another axis)"
                )
        elif _is_softmax(node, gm):
            found = _explicit_site(node, gm)
            shape = _shape(node)
            if found is None:
                if shape and len(shape) >= 3 and shape[-1] == shape[-2]:
                    unrecognised.append(f"softmax {node.name} over {list(shape)} in {module_path(node) or 'forward'}")
                continue
            q, kt, v, out = found
            site = _make_site(node, "softmax", q, _untranspose(kt), v, out, None, None)
            if site is None:
                unrecognised.append(f"softmax {node.name} over {list(shape) if shape else 'a map of unknown shape'} "
                                    f"in {module_path(node) or 'forward'} (queries not [B, H, N, d]: attention "
                                    "within windows or groups, or heads folded into another axis)")
        else:
            continue
        if site is not None:
            sites.append(site)
    return sites, unrecognised


def _make_site(node, kind, q, k, v, out, scale, mask) -> AttentionSite | None:
    qs, vs = _shape(q), _shape(v)
    if qs is None or vs is None or len(qs) != 4:
        return None
    return AttentionSite(
        node=node, kind=kind, module=module_path(node), q=q, k=k, v=v, output=out,
        num_heads=qs[1], head_dim=qs[3], batch=qs[0], queries=qs[2], keys=vs[2],
        scale=scale if isinstance(scale, (int, float)) else None,
        mask=mask if isinstance(mask, fx.Node) else None,
    )


# --------------------------------------------------------------------------------------------------
# Token stream


def _dataflow(start: fx.Node) -> nx.DiGraph:
    """The data edges from ``start`` on: a shape read carries no token values, so its edges are left out (a model
    that reads the patch grid once, for rotary tables or a reshape, still has a token stream)."""
    graph = nx.DiGraph()
    graph.add_node(start)
    todo = [start]
    while todo:
        node = todo.pop()
        for user in node.users:
            if is_shape_read(user):
                continue
            if user not in graph:
                todo.append(user)
            graph.add_edge(node, user)
    return graph


def _stream(
    gm: fx.GraphModule, sites: Sequence[AttentionSite], wanted: set[fx.Node]
) -> tuple[list[fx.Node], dict[fx.Node, fx.Node], ReadsApart]:
    """The token stream: dominators of the output (input first), once the values read apart from it are left out
    (reads of the input itself that lead to no attention, as a loss on the pixels; :func:`_reads_apart`, before
    the last self-attention of ``sites`` that is computed from the input and reaches the output, one of the nodes
    ``wanted`` it is computed from: an attention pool or class attention after it reads the final tokens, blocks
    after it whose output nothing reads are dead code); the immediate-dominator map; and those reads."""
    start = next(iter(gm.graph.find_nodes(op="placeholder")))
    output = next(iter(gm.graph.find_nodes(op="output")))
    flow = _dataflow(start)
    attentions = {site.node for site in sites}
    apart = [(start, reader) for reader in flow.successors(start) if not attentions & ({reader} | descendants(reader))]
    if apart:  # the input read apart from the tokens (a loss on the pixels), where the output also reads them
        kept = flow.copy()
        kept.remove_edges_from(apart)
        flow = kept if nx.has_path(kept, start, output) else flow
    idom = nx.immediate_dominators(flow, start)
    last = [site.output for site in sites if site.output in idom and site.output in wanted
            and site.queries == site.keys]
    other = _other_elements(flow, ancestors([last[-1]])) if last else []
    if other:
        flow.remove_edges_from(other)
        idom = nx.immediate_dominators(flow, start)
    reads = _reads_apart(flow, idom, start, last[-1], wanted) if last else ()
    if reads:
        flow.remove_edges_from(reads)
        idom = nx.immediate_dominators(flow, start)
    chain = [output]
    while chain[-1] is not start:
        chain.append(idom[chain[-1]])
    return chain[::-1], idom, reads


def _other_elements(flow: nx.DiGraph, before: set[fx.Node]) -> list[tuple[fx.Node, fx.Node]]:
    """The edges from a tuple of values that leads to the last self-attention (a module's outputs: ViTMAE's
    embeddings give the tokens, the mask and the order that restores it) to reads of its other elements than the
    ones ``before`` it (what that attention is computed from) reads: they read no tokens. No edge of a tuple that is
    also read whole."""
    cut = []
    for node in before & flow.nodes:
        readers = list(flow.successors(node))
        if not isinstance(node.meta.get("val"), (tuple, list)) or not all(
                reader.op == "call_function" and reader.target is operator.getitem for reader in readers):
            continue
        kept = {reader.args[1] for reader in readers if reader in before}
        cut += [(node, reader) for reader in readers if reader.args[1] not in kept]
    return cut


def _reads_apart(flow: nx.DiGraph, idom: dict[fx.Node, fx.Node], start: fx.Node, last: fx.Node,
                 wanted: set[fx.Node]) -> ReadsApart:
    """The pairs ``(value, reader)`` where the output reads a value of the token stream apart from it (the hidden
    states of intermediate blocks that a dense-prediction neck, a list of feature maps or of hidden states reads):
    ``value``, computed from the input, comes before the last self-attention's output ``last`` and leads to it
    (every path from the input to ``last`` passes it); ``reader``, one of the nodes the output is computed from
    (``wanted``), does not lead to ``last``, and it and what it computes meet what ``last`` does only in values
    of another shape than ``value``'s (a parallel branch beside the attention meets it in the block's residual
    addition, a token sequence: no read apart; an output structure holding the hidden states and the final tokens
    is one)."""
    chain = [idom[last]]
    while chain[-1] is not start:  # the input itself is no token value
        chain.append(idom[chain[-1]])
    chain.pop()
    before, after = ancestors([last]), descendants(last)
    return tuple(
        (value, reader) for value in reversed(chain) for reader in flow.successors(value)
        if reader not in before and reader in wanted
        and not any(_shape(node) == _shape(value) for node in ({reader} | descendants(reader)) & after)
    )


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("add", "__add__", "add_")
    )


def _common_module(a: fx.Node, b: fx.Node) -> str:
    sa = list((a.meta.get("nn_module_stack") or {}).keys())
    sb = set((b.meta.get("nn_module_stack") or {}).keys())
    common = [name for name in sa if name in sb]
    return common[-1] if common else ""


def _position_terms(site: AttentionSite, stop: set[fx.Node], tokens: int, prefix: int,
                    data: set[fx.Node]) -> list[PositionTerm]:
    """The :class:`PositionTerm` s that shape q, k, the mask or the logits of ``site`` (``tokens`` rows entering its
    block, ``prefix`` of them prefix tokens); ``data``: the nodes that depend on the input's values."""
    sizes = {tokens, tokens - prefix, tokens**2, (tokens - prefix) ** 2} - {0, 1}
    roots = [(n, site.node) for n in (site.q, site.k, site.mask) if isinstance(n, fx.Node)]
    if site.kind == "softmax":
        roots.append((site.node, site.node))
    seen: set[fx.Node] = set()
    readers: dict[fx.Node, list[fx.Node]] = {}
    while roots:
        node, reader = roots.pop()
        if node in stop:
            continue
        if node.op != "placeholder" and node not in data:
            shape = _shape(node)
            if all(u.op == "call_function" and u.target in _WEIGHT_CONSUMERS for u in node.users):
                continue  # a weight or what builds one (BEiT's q, k, v biases): its axes are channels, not tokens
            if shape and sizes & set(shape):
                if reader not in readers.setdefault(node, []):
                    readers[node].append(reader)
                continue
            if node.op == "get_attr":
                continue
        if node in seen:
            continue
        seen.add(node)
        roots.extend((n, node) for n in node.all_input_nodes)
    return [_term(node, tuple(found), site, tokens, prefix) for node, found in readers.items()]


def _term(node: fx.Node, readers: tuple[fx.Node, ...], site: AttentionSite, tokens: int, prefix: int) -> PositionTerm:
    """``node`` as a position term: its token axes are those of ``tokens`` or ``tokens - prefix`` entries, unless a
    head size or count could take the same value (then none: they cannot be told apart)."""
    shape = _shape(node) or ()
    for size, patches_only in ((tokens, False), (tokens - prefix, True)):
        axes = tuple(i for i, s in enumerate(shape) if s == size)
        if axes:
            other = tokens if patches_only else tokens - prefix
            heads = {site.head_dim, 2 * site.head_dim, site.head_dim // 2, site.num_heads}
            clear = size not in heads and (other == size or other not in shape)
            return PositionTerm(node, readers, axes if clear and len(axes) <= 2 else (), patches_only)
    return PositionTerm(node, readers, (), False)


def _from_module_called_whole(first_input: fx.Node, data: set[fx.Node]) -> bool:
    """Whether ``first_input``, the stream entering the first block, is computed from the output of a module with
    submodules that the capture called whole (a registered leaf, or one it could not trace into), where a ``cat``
    that builds the sequence cannot be seen."""
    owner = first_input.graph.owning_module
    return any(node.op == "call_module" and next(owner.get_submodule(node.target).children(), None) is not None
               for node in ancestors([first_input]) if node in data)


def reachable(starts: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]],
              stop: fx.Node | None = None) -> set[fx.Node]:
    """``starts`` and every node reached from them by ``step`` (e.g. a node's users), not going past ``stop``."""
    seen, todo = set(), list(starts)
    while todo:
        node = todo.pop()
        if node not in seen and node is not stop:
            seen.add(node)
            todo.extend(step(node))
    return seen


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """``nodes`` and every node they are computed from."""
    return reachable(nodes, lambda node: node.all_input_nodes)


def descendants(node: fx.Node) -> set[fx.Node]:
    """Every node computed from ``node`` (not ``node`` itself)."""
    return reachable(node.users, lambda user: user.users)


def _sequence_cat(first_input: fx.Node, data: set[fx.Node]) -> fx.Node | None:
    """The ``cat`` along the token axis that builds the token sequence entering the first block, if any; ``data``:
    the nodes that depend on the input's values."""
    before = ancestors([first_input])
    for node in reversed(first_input.graph.nodes):
        if node in before and node.op == "call_function" and node.target is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim in (1, -2) and any(p in data for p in node.args[0]):
                return node
    return None


_ROW_WISE_MODULES = (nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Identity, nn.Dropout)
_ROW_WISE_FUNCTIONS = (F.linear, F.layer_norm, F.rms_norm, F.dropout)
_REARRANGEMENTS = ("reshape", "view", "permute", "transpose", "unbind", "contiguous")


def row_slice(index: Any) -> slice | None:
    """The rows ``a:b`` that the index ``[:, a:b]`` (or ``[:, a:b, :]``, ``[:, a:b, ...]``) of a ``[B, N, C]`` value
    takes; None for any other index."""
    if not (isinstance(index, tuple) and 2 <= len(index) <= 3 and index[0] == slice(None)
            and isinstance(index[1], slice) and index[1].step in (None, 1)):
        return None
    return index[1] if len(index) == 2 or index[2] in (slice(None), Ellipsis) else None


def _prefix_tokens(first_input: fx.Node, info: TraceInfo, data: set[fx.Node]) -> int:
    """The tokens before the patches in ``first_input``, the stream entering the first block: none without a
    ``cat`` that builds the sequence (CaiT joins its class token only after its self-attention blocks) unless a
    module called whole builds it (timm's NaFlexViT embeddings), else timm's ``num_prefix_tokens`` when the model
    has it, otherwise its leading rows that do not depend on the input's values
    (:func:`_constant_rows`) or, where those cannot be followed, the rows of the ``cat``'s parts before its first
    part that does."""
    cat = _sequence_cat(first_input, data)
    if cat is None:
        hidden = info.prefix_tokens_attr is not None and _from_module_called_whole(first_input, data)
        return info.prefix_tokens_attr if hidden else 0
    if info.prefix_tokens_attr is not None:
        return info.prefix_tokens_attr
    parts = cat.args[0]
    patch = next(i for i, p in enumerate(parts) if p in data)
    return _constant_rows(first_input, data) or sum(_shape(p)[1] for p in parts[:patch])


def _tokens_after_patches(first_input: fx.Node, prefix: int, data: set[fx.Node]) -> str | None:
    """Why no block can be reduced when trailing rows of ``first_input``, the stream entering the first block, do not
    depend on the image (tokens after the patches: YOLOS's detection tokens), else None."""
    shape = _shape(first_input)
    rows = _constant_rows(first_input, data, last=True) if shape is not None and len(shape) == 3 else 0
    if not 0 < rows < shape[1] - prefix:
        return None
    count = shape[1]
    return (f"rows {count - rows}–{count - 1} of the {count} tokens entering the first block do not depend on the "
            "image: tokens after the patches (detection or query tokens, as YOLOS's), which every method would take "
            "for patches and drop, merge or cluster (fxprune keeps apart only the tokens before the patches); no "
            "block of this model can be reduced")


_ELEMENTWISE = (operator.add, operator.mul, operator.sub, torch.add, torch.mul, "add", "mul", "sub")


def _constant_rows(node: fx.Node, data: set[fx.Node], last: bool = False) -> int:
    """How many leading rows (``last``: trailing rows) on axis 1 of the ``[B, N, C]`` value ``node`` do not depend
    on the input's values: followed through ``cat`` along the rows, row slices ``x[:, a:b]``, elementwise arithmetic
    and row-wise layers (HF's DINOv2 puts its registers between ``x[:, :1]`` and ``x[:, 1:]`` of a sequence that
    already holds the class token; YOLOS puts its detection tokens after the patches); 0 where it cannot tell."""
    shape = _shape(node)
    if shape is None or len(shape) != 3:
        return 0
    if node not in data:
        return shape[1]
    target = node.target
    if node.op == "call_function" and target is torch.cat and node.kwargs.get(
            "dim", node.args[1] if len(node.args) > 1 else 0) in (1, -2):
        total = 0
        for part in reversed(node.args[0]) if last else node.args[0]:
            rows = _constant_rows(part, data, last)
            total += rows
            if rows < (_shape(part) or (0, 0))[1]:
                break
        return total
    if node.op == "call_function" and target is operator.getitem:
        source, rows = node.args[0], row_slice(node.args[1])
        if rows is None or _shape(source) is None:
            return 0
        count = _shape(source)[1]
        taken, constant = range(count)[rows], _constant_rows(source, data, last)
        if not taken:
            return 0
        if last:
            return max(0, taken.stop - max(taken.start, count - constant))
        return max(0, min(constant, taken.stop) - taken.start)
    if target in _ELEMENTWISE and node.op in ("call_function", "call_method"):
        return min((_constant_rows(arg, data, last) for arg in node.args if isinstance(arg, fx.Node) and arg in data),
                   default=0)
    if _row_wise(node) or (node.op == "call_method" and target == "contiguous"):
        return _constant_rows(node.args[0], data, last) if isinstance(node.args[0], fx.Node) else 0
    return 0


def _row_wise(node: fx.Node) -> bool:
    """Whether ``node`` is a layer that computes each row of its first input on its own (a linear layer, a norm,
    dropout), as a module or a function."""
    if node.op == "call_module":
        return isinstance(node.graph.owning_module.get_submodule(node.target), _ROW_WISE_MODULES)
    return node.op == "call_function" and node.target in _ROW_WISE_FUNCTIONS


def _has_class_token(found: Readout, prefix: int, info: TraceInfo) -> bool:
    """Whether the first prefix token is a class token: its final row reaches output elements that no patch row
    reaches (:mod:`fxprune.readout`). Where the graph after the final tokens cannot be tested, timm's
    ``has_class_token`` answers, and a model without it has none."""
    if found.why is not None:
        return bool(info.class_token_attr) and prefix > 0
    return prefix > 0 and 0 in found.class_rows


def _first_failure(info: TraceInfo) -> str:
    """Why the first module kept whole could not be traced, on which inputs, and what to do (empty: none failed)."""
    if not info.leaves:
        return ""
    name, why = info.leaves[0]
    return _failed_on_inputs(info, f"Tracing {name} failed", f" ({why})")


def _failed_value(info: TraceInfo) -> str:
    """Where example values stopped during capture, on which inputs, and what to do (empty: nowhere)."""
    if info.failed_value is None:
        return ""
    return _failed_on_inputs(info, f"Example values stop at {info.failed_value}")


def _failed_on_inputs(info: TraceInfo, failure: str, detail: str = "") -> str:
    """`` {failure} on inputs {shapes}{detail}``, the shapes of the example inputs it was captured on, and what to do
    if the model expects other inputs."""
    shapes = ", ".join(str(shape) for shape in info.example_shapes)
    return (f" {failure} on inputs {shapes}{detail}: if {info.model_class} expects other inputs, pass example_inputs "
            "of that shape to fxprune.transform (or trace/analyse).")


def analyse(model: nn.Module, example_inputs: ExampleInputs = None) -> TokenProgram:
    """Describe the attention blocks, token stream and prefix tokens of ``model``.

    ``model`` is captured with :func:`fxprune.trace` first, unless it is a ``GraphModule`` that
    ``fxprune.trace`` returned (then it is analysed as it is; passes will change it).
    ``print(fxprune.analyse(model))`` gives a readable summary. Raises
    :class:`~fxprune.UnsupportedModelError` when the model has no attention.
    """
    captured = (
        isinstance(model, fx.GraphModule)
        and "fxprune_trace" in model.meta
        and not hasattr(model, "fxprune_plan")
        and example_inputs is None
    )
    gm = model if captured else trace(model, example_inputs)
    info: TraceInfo = gm.meta["fxprune_trace"]
    sites, unrecognised = find_attention(gm)
    kept = _kept_whole(gm, info)
    if not sites:
        hidden = [name for name, _ in info.leaves] + kept
        raise UnsupportedModelError(
            f"found no attention in {info.model_class}: fxprune rewrites the attention blocks of vision "
            "transformers (SDPA calls or softmax(q @ kᵀ) @ v over [B, H, N, d] queries, keys and values)."
            + (" Modules or functions called whole may hide it: " + ", ".join(hidden[:4])
               + (", …" if len(hidden) > 4 else "") + "." + _first_failure(info) if hidden else "")
            + (f" It found {len(unrecognised)} attention call(s) it cannot read: " + "; ".join(unrecognised[:2])
               + (f"; and {len(unrecognised) - 2} more" if len(unrecognised) > 2 else "") + "." + _failed_value(info)
               if unrecognised else "")
        )
    wanted = ancestors(gm.graph.find_nodes(op="output"))
    stream, idom, reads = _stream(gm, sites, wanted)
    unreached = [site for site in sites if site.node not in idom]  # e.g. a decoder's self-attention of its queries
    if unreached:
        first, *others = gm.graph.find_nodes(op="placeholder")
        reached = {value: descendants(value) for value in others}
        unrecognised += [_unreached(site, first, reached, sites) for site in unreached]
    unrecognised += [f"attention {site.node.name} in {site.module or 'forward'} (the output reads nothing it "
                     "computes: a block after the last one the output reads, which the rewritten model drops as "
                     "dead code)"
                     for site in sites if site.node in idom and site.output not in wanted]
    sites = [site for site in sites if site.node in idom and site.output in wanted]
    if not sites:
        raise UnsupportedModelError(
            f"found no attention over the input's tokens whose result the output reads in {info.model_class}: "
            + "; ".join(unrecognised[:2]) + ("; …" if len(unrecognised) > 2 else "")
            + ". fxprune rewrites the attention blocks that the model's output is computed from."
        )
    on_stream = set(stream)
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    anchors = []
    for site in sites:
        anchor = site.node
        while anchor not in on_stream:
            anchor = idom[anchor]
        later = [n for n in stream if position[n] > position[site.output]]
        mid = later[0] if later else None
        while mid is not None and "fxprune" in mid.meta:  # a selection inserted earlier takes the stream as arg 0
            mid = mid.args[0]
        anchors.append((anchor, mid))
    first = anchors[0][0]
    batch = _shape(first)[0] if _shape(first) else sites[0].batch
    data = data_nodes(gm)
    prefix = _prefix_tokens(first, info, data)
    blocks = tuple(
        _block(index, site, anchor, mid, batch, prefix, on_stream, data, position)
        for index, (site, (anchor, mid)) in enumerate(zip(sites, anchors))
    )
    blocks = _side_by_side(blocks)
    towers = _stream_towers(sites)
    if len(towers) > 1:  # every block: no one token stream
        several = _several_streams(towers)
        blocks = tuple(dataclasses.replace(block, refusal=several, needs_all_tokens=True) for block in blocks)
    late = _tokens_after_patches(first, prefix, data)
    if late is not None:  # every block: the tokens keep their place after the patches
        blocks = tuple(block if block.refusal else dataclasses.replace(block, refusal=late) for block in blocks)
    maps = [block.name for block in blocks if _map_read(block.attention, wanted)]
    if maps:  # every block: the stream ends where the first map read is computed
        read = (f"the model's output reads the attention maps of {', '.join(maps[:3])}{', …' if len(maps) > 3 else ''}"
                " (Hugging Face's output_attentions=True), whose sizes a reduction would change; transform the model "
                "with output_attentions=False (in its config), or reduce tokens only after the last map it returns")
        blocks = tuple(dataclasses.replace(block, refusal=read, needs_all_tokens=True) for block in blocks)
    shape = _shape(first) or (batch, 0, 0)
    tokens, dim = (shape[1], shape[2]) if len(shape) == 3 else (0, 0)
    final = _final_tokens(blocks, stream, batch, dim, tokens)
    if final is None and any("fxprune" in node.meta for node in gm.graph.nodes):  # an earlier transform's rows
        final = _final_tokens(blocks, stream, batch, dim)
    found = readout(gm, final, prefix, data)
    return TokenProgram(
        gm, blocks, prefix, _has_class_token(found, prefix, info), tokens, dim, batch, stream, info,
        info.model_class, [*unrecognised, *(f"{name}, called whole: attention inside it is not seen" for name in kept)],
        found, reads,
    )


def _calls(site: AttentionSite) -> list[str]:
    """The module calls ``site`` was traced in, outermost first (``name@k``: the module's call after its first k)."""
    return list(site.node.meta.get("nn_module_stack") or {})


def _tower(site: AttentionSite, others: Iterable[AttentionSite]) -> str:
    """The qualified name of the outermost module whose call holds ``site`` and none of the attentions ``others``:
    the tower it runs in, or the module called once per stream ('' where no module call holds it alone)."""
    taken = {call for other in others for call in _calls(other)}
    return next((call for call in _calls(site) if call not in taken), "").partition("@")[0]


def _stream_towers(sites: Sequence[AttentionSite]) -> list[str]:
    """The :func:`_tower` of each token stream the attentions ``sites`` (in graph order) run on, in the order of
    their first attentions. Two attentions are on one stream when one is computed from the other's output, directly
    or through others (a block's parallel branches meet in their sum, so they are one stream); an ensemble, or a
    module called on several views of the input, has one stream per tower or call."""
    index = {site.output: i for i, site in enumerate(sites)}
    streams = nx.utils.UnionFind(range(len(sites)))
    after: dict[fx.Node, frozenset[int]] = {}  # the attentions each node is computed from
    for node in sites[0].node.graph.nodes if sites else ():
        found = frozenset().union(*(after[value] for value in node.all_input_nodes if value in after))
        if node in index:
            streams.union(index[node], *found)
            found = frozenset({index[node]})
        if found:
            after[node] = found
    groups = sorted((sorted(group) for group in streams.to_sets()), key=min)
    return [_tower(sites[group[0]], [sites[i] for i in range(len(sites)) if i not in group]) for group in groups]


def _several_streams(towers: list[str]) -> str:
    """Why no block of a model whose attentions run on the token streams of ``towers`` (:func:`_stream_towers`) is
    reduced, and what to do."""
    if "" in towers:
        advice = "transform a module that runs each stream on its own"
    elif len(set(towers)) == 1:
        advice = (f"transform {towers[0]} itself, model.{towers[0]} = fxprune.transform(model.{towers[0]}, policy), "
                  "and every call runs the rewritten graph")
    else:
        advice = f"transform each on its own, e.g. model.{towers[0]} = fxprune.transform(model.{towers[0]}, policy)"
    named = ", ".join(dict.fromkeys(tower or "forward" for tower in towers))
    runs = f"{towers[0]} runs on {len(towers)} token streams (it is called once for each, e.g. on views of the " \
        "input)" if len(set(towers)) == 1 and towers[0] else \
        f"the model's attention runs on {len(towers)} token streams ({named}: an ensemble, or a model with several " \
        "towers)"
    return f"{runs}, which the output joins only after their blocks; fxprune reduces one token stream: {advice}"


FROM_ANOTHER_INPUT = "computed from the input"  # how a note on an attention left on another input begins


def _unreached(site: AttentionSite, first: fx.Node, reached: dict[fx.Node, set[fx.Node]],
               sites: Sequence[AttentionSite]) -> str:
    """What an attention not computed from the values of the first input ``first`` is (said when it is left as is):
    computed from another input (a model run on several inputs; ``reached``: each other input and the nodes computed
    from it) or from no input (learned queries)."""
    source = next((value for value, nodes in reached.items() if site.node in nodes), None)
    where = f"attention {site.node.name} in {site.module or 'forward'}"
    if source is None:
        return f"{where} (computed from no value of the input: learned queries attending to each other)"
    elsewhere = [other for other in sites if other.node not in reached[source]]
    tower = _tower(site, elsewhere)
    shared = any(call.partition("@")[0] == tower for other in elsewhere for call in _calls(other))  # siamese
    advice = f"transform {tower} on its own, model.{tower} = fxprune.transform(model.{tower}, policy), to reduce " \
        + ("each of its calls" if shared else "its tokens") if tower else "transform a module that runs it on its own"
    return f"{where} ({FROM_ANOTHER_INPUT} {source.name}, not {first.name}, whose token stream fxprune reduces: " \
        f"{advice})"


def _map_read(site: AttentionSite, wanted: set[fx.Node]) -> bool:
    """Whether the output reads ``site``'s attention map (an explicit softmax's probabilities, or that map after
    dropout on its way to the product with the values) apart from that product: a node the output is computed
    from (``wanted``) reads it and does not lead to the attention's output (the map returned beside it)."""
    if site.kind != "softmax":
        return False
    path, shape = ancestors([site.output]), _shape(site.node)
    maps = [node for node in (path & descendants(site.node) | {site.node}) - {site.output} if _shape(node) == shape]
    return any(user in wanted and user not in path and not is_shape_read(user) for node in maps for user in node.users)


def final_tokens(program: TokenProgram) -> fx.Node | None:
    """The last ``[B, N, C]`` value of the token stream (after the last block of self-attention and any final
    norm, before pooling or the class token's row is read): the model's output tokens, or None when the stream has
    none after that block."""
    return _final_tokens(program.blocks, program.stream, program.batch, program.dim)


def last_self_attention(blocks: Sequence[Block]) -> Block:
    """The last of ``blocks`` whose queries are its keys (an attention pool or class attention after it reads the
    tokens), or the last block when none is."""
    return next((b for b in reversed(blocks) if b.attention.queries == b.attention.keys), blocks[-1])


def _final_tokens(
    blocks: Sequence[Block], stream: list[fx.Node], batch: int, dim: int, count: int | None = None
) -> fx.Node | None:
    """The last ``[batch, N, dim]`` stream node (``N == count`` unless ``count`` is None) after the last block of
    self-attention (:func:`last_self_attention`)."""
    block = last_self_attention(blocks)
    tokens = [n for n in _stream_after(stream, block) if (shape := _shape(n)) is not None and len(shape) == 3
              and shape[0] == batch and shape[2] == dim and count in (None, shape[1])]
    return tokens[-1] if tokens else None


def _stream_after(stream: list[fx.Node], block: Block) -> list[fx.Node]:
    """The stream nodes from ``block``'s residual add after its attention (its input when it has none) on."""
    last = block.mid or block.input
    return stream[stream.index(last):] if last in stream else []


def op_name(node: fx.Node) -> str:
    """The name of what ``node`` calls: a method's name or a function's ``__name__``."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


_REDUCTIONS = ("mean", "sum", "amax", "max", "logsumexp")


def token_pooling(program: TokenProgram) -> fx.Node | None:
    """The first reduction over the token axis (dim 1) of a ``[B, N, C]`` value after the last block, if any."""
    last = program.blocks[-1].mid or program.blocks[-1].input
    after = False
    for node in program.gm.graph.nodes:
        after = after or node is last
        if not after or node.op not in ("call_method", "call_function") or not node.args:
            continue
        name = op_name(node)
        source = _val(node.args[0])
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if name in _REDUCTIONS and isinstance(source, torch.Tensor) and source.dim() == 3 and dim in (
            1, -2, (1,), (-2,)
        ):
            return node
    return None


def pooled_rows(program: TokenProgram, pool: fx.Node) -> tuple[fx.Node, slice] | None:
    """(stream node, rows) when ``pool`` is a mean over the rows ``rows`` of a node of the token stream after the
    last block (``x.mean(1)``, ``x[:, P:].mean(1)``): a pool that the rows' sizes can weight. Else None."""
    source = pool.args[0]
    if op_name(pool) != "mean" or not isinstance(source, fx.Node):
        return None
    rows = slice(None)
    if source.op == "call_function" and source.target is operator.getitem:
        source, rows = source.args[0], row_slice(source.args[1])
        if rows is None:
            return None
    full = _shape(source) == (program.batch, program.tokens, program.dim)
    return (source, rows) if source in _stream_after(program.stream, program.blocks[-1]) and full else None


def key_rows(program: TokenProgram, block: Block) -> slice | None:
    """The rows ``rows`` of the final tokens (:func:`final_tokens`) whose ``x[:, rows]`` ``block``'s attention
    keys are computed from, each key from its own row (linear layers, norms and head rearrangements on the way):
    an attention pool after the last block, ``kv(x[:, P:])`` or ``kv(x)``. None where they are not (keys joined
    from elsewhere, pooled, or no attention pool)."""
    final = _final_tokens(program.blocks, program.stream, program.batch, program.dim, program.tokens)
    node = block.attention.k
    while node is not None and node is not final:
        if node.op == "call_function" and node.target is operator.getitem:
            source, index = node.args
            if source is final and row_slice(index) is not None:
                rows = row_slice(index)
                break
            node = source if isinstance(index, int) and isinstance(source, fx.Node) else None
        elif _row_wise(node) or (node.op == "call_method" and node.target in _REARRANGEMENTS):
            node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        else:
            node = None
    else:
        rows = slice(None)
    return rows if node is not None and len(range(program.tokens)[rows]) == block.attention.keys else None


def _parallel_branch(site: AttentionSite, anchor: fx.Node, mid: fx.Node, position: dict[fx.Node, int]
                     ) -> fx.Node | None:
    """The first module call (else the first node) of a branch beside the attention ``site`` in its block: computed
    from the block input ``anchor`` and read by ``mid``, the stream node after the attention, without passing
    through the attention (neither an input of it nor computed from its output; shape reads aside), as the MLP of a
    parallel block (ViT-22B's ``x + attention(norm(x)) + mlp(norm(x))``). None when the block adds the attention's
    branch alone. ``position``: each node's place in the graph."""
    inside, after, feeds = ancestors([site.output]), descendants(site.output), ancestors([mid])
    skip = {mid, site.output} | after
    found = reachable(anchor.users, lambda node: () if node in skip or is_shape_read(node) else node.users)
    beside = [node for node in found if node in feeds and node not in inside and node not in skip
              and not is_shape_read(node)]
    return min(beside, key=lambda node: (node.op != "call_module", position[node]), default=None)


def _residual_addition(site: AttentionSite) -> fx.Node | None:
    """The first addition after the attention's output that adds a value the attention is computed from (the
    block's residual addition), or None."""
    before = ancestors([site.node])
    todo, seen = [site.output], set()
    while todo:
        node = todo.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if _is_add(node) and any(arg in before for arg in node.all_input_nodes):
            return node
        todo.extend(user for user in node.users if not is_shape_read(user))
    return None


def _joins_by_additions(residual: fx.Node, mid: fx.Node) -> bool:
    """Whether the residual addition ``residual`` reaches ``mid`` through additions alone, each its only reader
    (``(x + attention(x)) + mlp(x)``: a parallel block's branches added one after the other)."""
    node = residual
    while node is not mid:
        readers = [user for user in node.users if not is_shape_read(user)]
        if len(readers) != 1 or not _is_add(readers[0]):
            return False
        node = readers[0]
    return True


def _block(
    index: int, site: AttentionSite, anchor: fx.Node, mid: fx.Node | None, batch: int, prefix: int,
    on_stream: set[fx.Node], data: set[fx.Node], position: dict[fx.Node, int],
) -> Block:
    """Block ``index``: its attention ``site``, the stream node ``anchor`` entering it and the residual add ``mid``
    (``position``: each node's place in the graph)."""
    name = site.module or f"attention{index}"
    if mid is not None:
        name = _common_module(site.node, mid) or name
    shape = _shape(anchor)
    tokens = shape[1] if shape is not None and len(shape) == 3 and shape[0] == batch else 0
    terms = tuple(_position_terms(site, on_stream, tokens, prefix, data)) if tokens else ()
    parallel = _parallel_branch(site, anchor, mid, position) if mid is not None else None
    refusal, needs_all_tokens = _refusal(site, anchor, mid, shape, batch, terms)
    return Block(index, name, site, anchor, mid, tokens, refusal, needs_all_tokens, terms, parallel)


def _side_by_side(blocks: tuple[Block, ...]) -> tuple[Block, ...]:
    """``blocks``, those whose attention's branch meets another attention's in one residual addition refused: a
    method ranks a block's tokens by one attention map per head. The attentions are parallel ones (timm's
    ``ParallelThingsBlock``), or maps one module computes and combines (differential attention)."""
    meeting: dict[fx.Node, list[Block]] = {}
    for block in blocks:
        if block.mid is not None:
            meeting.setdefault(block.mid, []).append(block)

    def refused(block: Block) -> Block:
        others = [other for other in meeting[block.mid] if other is not block]
        module = block.attention.module
        if module is not None and all(other.attention.module == module for other in others):
            return dataclasses.replace(block, refusal=(
                f"its module {module} computes {len(others) + 1} attention maps over the tokens and combines them "
                "(differential attention, as the Diff Transformer's); fxprune reduces the tokens of a block whose "
                "attention has one map per head"))
        names = [other.attention.module or other.attention.node.name for other in others]
        return dataclasses.replace(block, refusal=(
            f"its attention runs beside {', '.join(names)} in one residual branch (parallel attentions); fxprune "
            "reduces the tokens of a block with one attention"))

    return tuple(refused(block) if block.mid is not None and len(meeting[block.mid]) > 1 and block.reducible
                 else block for block in blocks)


_JOINED = "joins them with a later block's as a token sequence (a sum of several blocks' outputs)"


def _refusal(
    site: AttentionSite, anchor: fx.Node, mid: fx.Node | None, shape: tuple[int, ...] | None, batch: int,
    terms: tuple[PositionTerm, ...],
) -> tuple[str | None, bool]:
    """Why a block's tokens cannot be reduced (None: they can), and whether it also needs every token (see
    :class:`Block`)."""
    if shape is None and "fxprune" in anchor.meta:
        return (
            f"it follows {anchor.name}, inserted by an earlier fxprune transform, which carries token "
            "sizes (ToMe, ATS) to every later attention; rewrite the original model with all policies in one "
            "transform (fxprune.Compose)"
        ), True
    if site.queries != site.keys:
        return (
            f"attention has {site.queries} queries and {site.keys} keys (class attention, an attention pool, "
            "cross-attention or keys pooled from the tokens), not self-attention over the stream"
        ), False
    if shape is None or len(shape) != 3 or shape[0] != batch:
        return f"the stream entering it is {shape}, not a [B, N, C] token sequence", True
    if site.batch != batch and (shape[0], shape[1]) == (site.queries, site.batch):
        return (
            f"the stream entering it is sequence first ({list(shape)}: [N, B, C], as nn.TransformerEncoder and "
            "nn.MultiheadAttention lay it out unless batch_first=True); fxprune reduces a [B, N, C] stream: build "
            "the model with batch_first=True"
        ), True
    if site.batch != batch:
        return (
            f"attention runs over {site.batch} sequences for a batch of {batch} (windowed attention); "
            "windows cannot lose tokens"
        ), True
    if site.queries != shape[1] or site.keys != shape[1]:
        return (
            f"attention has {site.queries} queries and {site.keys} keys for {shape[1]} tokens (its map is not over "
            "the stream's tokens: channel attention, or attention over another sequence)"
        ), False
    if mid is None or _shape(mid) != shape:
        after = "ends" if mid is None else f"is {mid.name}, of shape {_shape(mid)}"
        return (
            f"the token stream leaves the tokens before its attention's output (after it, the stream {after}): the "
            f"model's output reads no token sequence after it, or reads an earlier block's tokens and {_JOINED}"
        ), True
    if not _is_add(mid) or anchor not in mid.all_input_nodes:
        residual = _residual_addition(site)
        if residual is None:
            return "no residual addition of the block input after attention", False
        if residual is mid or not _joins_by_additions(residual, mid):  # else (x + attention) + mlp: parallel
            return (
                f"its residual addition {residual.name} is not on the token stream: the model's output also reads "
                f"this block's tokens and {_JOINED}"
            ), True
    unplaced = [str(term) for term in terms if not term.axes]
    if unplaced:
        return (
            f"its attention uses position-dependent table(s) {', '.join(unplaced)} laid out for all "
            f"{shape[1]} tokens (relative position bias or rotary embedding) whose token axes cannot be told from "
            "its other axes"
        ), True
    return None, False
