"""AdaViT: per-image decisions to use each block's attention heads, its two sub-layers and its patch tokens.

As the official code (``MengLcool/AdaViT``, ``models/ada_transformer_block.py``, released configuration
``--ada-head --ada-layer --ada-token-with-mlp``), a block with decisions has three linear decision heads:

* ``heads``: ``Linear(C, H)`` and ``sublayers``: ``Linear(C, 2)`` (attention, MLP) on the class token entering the
  block (before its first norm);
* ``tokens``: ``Linear(C, 1)`` on each patch token of the attention's input (after the first norm); prefix tokens
  are always used.

A decision is ``sigmoid(logit) > threshold`` (0.5; tokens 0.6) at evaluation and a hard Gumbel-sigmoid sample
(τ = 5, straight-through) in training, made in each block independently (a token unused in one block may be used
in the next). Applied as the official code applies them (the "masked" semantics):

* an unused head has its q, k, v and output channels zeroed, and its channels at the input of the MLP's first
  linear layer too (``ada_head_v2=False``);
* an unused token is no key for the others, attends to itself only, and gets no update from the attention or
  the MLP (``ada_token_with_mlp``): the residual carries it unchanged;
* an unused sub-layer adds nothing.

``layers=None`` is the official setting: heads and sub-layers decided in every block but the first, tokens in
every block. The decision heads are submodules ``fxprune.<block>.{heads,sublayers,tokens}`` shared by the training
and evaluation graphs; the values each block decides are emitted (:data:`HEADS_KEY`, :data:`SUBLAYERS_KEY`,
:data:`TOKENS_KEY`, ``fxprune.collect``) for :class:`fxprune.losses.AdaViTLoss`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..analysis import Block, TokenProgram, sdpa_arguments
from ..errors import PolicyError, UnsupportedModelError, qualified_name
from ..ops import POSITIONS, op_of
from ..ops.emitting import collect, emit
from ..ops.gating import (
    apply_factor,
    batch_rows,
    channel_gate,
    combine_masks,
    every_one,
    gumbel_gate,
    head_gate,
    mask_at_heads,
    mask_logits,
    one_row_without_heads,
    place_heads,
    project_from_heads,
    project_head_channels,
    project_heads,
    select_heads,
    sublayer_gate,
    take_rows,
    threshold_gate,
    threshold_mask,
    token_gate,
    usage_mask,
    used_heads,
    used_layout,
    valid_keys,
    varying_heads,
)
from ..passes.common import Rewrite, Role, ancestors, graph_order, insert_call, reachable, tag_of
from ..passes.heads import HeadLayout, has_parameters, head_layout, is_linear, linear_parameters, producer
from ..passes.learned import LEARNED_PREFIX, insert_module
from ..passes.positions import place_terms
from ..passes.skipping import mark_skippable, run_on_used, sublayer_nodes, unpack
from ..passes.state import read_state
from ..policies import Policy, check_flag, check_layers, option, parse_flag, parse_layers, parse_number, parse_text
from ..tools.weights import SHIPPED, shipped
from .registry import Learned, register_method

__all__ = [
    "AdaViT", "HEADS_KEY", "SUBLAYERS_KEY", "TOKENS_KEY", "DECIDED", "BlockParts", "block_parts", "official_heads",
    "official_backbone", "set_usage",
]

HEADS_KEY = "adavit/heads/"  # + block name: the heads' decisions [B, H]
SUBLAYERS_KEY = "adavit/sublayers/"  # + block name: the sub-layers' decisions [B, 2] (attention, MLP)
TOKENS_KEY = "adavit/tokens/"  # + block name: every row's decision [B, N] (prefix rows 1)
HEAD_THRESHOLD, SUBLAYER_THRESHOLD, TOKEN_THRESHOLD = 0.5, 0.5, 0.6
DECIDED = ("heads", "sublayers", "tokens")  # what a block with all three decision heads decides


@dataclasses.dataclass(frozen=True)
class AdaViT(Policy):
    """AdaViT (Meng et al., CVPR 2022): learned per-image usage of heads, sub-layers and patch tokens.

    ``usage``: the target usage γ of the training loss. ``layers``: the blocks with all three decision heads
    (None: every block but the first, and token decisions in the first too, as the official code). ``weights``: a
    file of trained decision heads (``fxprune.save_weights``; with a fine-tuned backbone too), an official AdaViT
    checkpoint (its decision heads; :func:`official_backbone` reads its backbone), or ``"digits"`` (states
    fine-tuned for the digits ViT, where the package ships them); None: untrained, which the plan says.
    ``init_logit``: None for the official initialisation (weights truncated-normal, std 0.02, biases 0); a number
    starts every decision head at that constant logit (zero weights), e.g. a large one for a model that starts
    dense. ``skip``: the evaluation graph computes only what each image uses (shapes that depend on the data: eager
    only); False: it masks, as the official code (a static graph, for ``fxprune.lower`` and export). ``decides``:
    the kinds decided per image, of ``heads``, ``sublayers`` and ``tokens`` (all three by default, the released
    configuration; fewer as the official ``--ada-head``/``--ada-layer``/``--ada-token`` flags, e.g. for an
    ablation); the others are always used and have no decision head.
    """

    usage: float = option(parse_number)
    layers: tuple[int, ...] | None = option(parse_layers, default=None)
    weights: str | None = option(parse_text, default=None)
    init_logit: float | None = option(parse_number, "init", default=None)
    skip: bool = option(parse_flag, default=True)
    decides: tuple[str, ...] = option(tuple, default=DECIDED)
    token_only: tuple[int, ...] = dataclasses.field(default=(), repr=False)  # blocks with token decisions only

    def __post_init__(self) -> None:
        if not isinstance(self.usage, (int, float)) or not 0.0 < self.usage <= 1.0:
            raise PolicyError(f"AdaViT.usage must be in (0, 1], got {self.usage!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", check_layers(self.layers, "AdaViT"))
        check_flag(self.skip, "AdaViT.skip")
        kinds = tuple(self.decides) if isinstance(self.decides, (tuple, list)) else (self.decides,)
        if not kinds or any(kind not in DECIDED for kind in kinds) or len(set(kinds)) != len(kinds):
            raise PolicyError(f"AdaViT.decides must name some of {', '.join(DECIDED)} once each, got {self.decides!r}")
        object.__setattr__(self, "decides", tuple(kind for kind in DECIDED if kind in kinds))

    def bind(self, depth: int, patches: int | None = None) -> AdaViT:
        if self.layers is not None:
            return self
        if "tokens" not in self.decides:
            return dataclasses.replace(self, layers=tuple(range(1, depth)))
        return dataclasses.replace(self, layers=tuple(range(depth)), token_only=(0,))

    def tokens_out(self, tokens_in: int, prefix: int, layer: int) -> int:
        return tokens_in

    def describe(self) -> str:
        kinds = "" if self.decides == DECIDED else f" ({', '.join(self.decides)} only)"
        return f"{self.method} usage {self.usage:g}{kinds}" + ("" if self.weights else " (untrained)")

    def decided_in(self, layer: int) -> tuple[str, ...]:
        """The kinds decided per image in block ``layer``."""
        return ("tokens",) if layer in self.token_only else self.decides

    def action(self, layer: int) -> str:
        names = {"heads": "heads", "sublayers": "sub-layers", "tokens": "patches"}
        what = ", ".join(names[kind] for kind in self.decided_in(layer)) or "nothing"
        return f"{self.describe()}: {what} decided per image"

    def plan_notes(self) -> list[str]:
        notes = [f"{self.method}: usage is decided per image, so the MACs here are the dense model's; "
                 "fxprune.flops on images counts what each runs"]
        if not self.weights:
            notes.append(f"{self.method}: the decision heads are untrained: train the model, or pass weights=")
        return notes


@dataclasses.dataclass(frozen=True)
class BlockParts:
    """The nodes of a pre-norm block that AdaViT's masks apply to: the attention's input (after the first norm),
    the attention branch added at ``block.mid``, the MLP's residual add and branch, and the input of the MLP's
    first linear layer(s)."""

    attention_input: fx.Node
    attention_branch: fx.Node
    mlp_add: fx.Node
    mlp_branch: fx.Node
    mlp_input: fx.Node


def _branch(add: fx.Node, residual: fx.Node) -> fx.Node | None:
    """The operand of the residual ``add`` that is not ``residual``."""
    others = [arg for arg in add.args[:2] if arg is not residual]
    return others[0] if len(others) == 1 and isinstance(others[0], fx.Node) else None


def _named_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` calls a module whose class is named a linear layer (a quantized or low-rank one, as
    ``DynamicQuantizedLinear``)."""
    return node.op == "call_module" and "Linear" in type(gm.get_submodule(node.target)).__name__


def block_parts(gm: fx.GraphModule, program: TokenProgram, block: Block, what: str) -> BlockParts:
    """Find :class:`BlockParts` of ``block`` structurally; raises :class:`~fxprune.UnsupportedModelError` naming the
    block and the part ``what`` (the method) could not find."""

    def refuse(reason: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{what} cannot rewrite {block.name}: {reason}; leave it out of layers=")

    if block.parallel is not None:
        raise refuse(f"its MLP runs beside its attention from the block input (a parallel block, from "
                     f"{block.beside}), where {what} gates a block's attention and then its MLP")
    site = block.attention
    shapes = [getattr(node.meta.get("val"), "shape", None) if node is not None else None for node in (site.k, site.v)]
    if any(shape is None or len(shape) != 4 or shape[1] != site.num_heads for shape in shapes):
        raise refuse("its keys and values are not one per query head")
    q_linear = producer(gm, site.q)
    if q_linear is None:
        other = producer(gm, site.q, _named_linear)
        raise refuse("no linear layer makes its queries" if other is None else (
            f"its queries come from {other.target}, a {qualified_name(type(gm.get_submodule(other.target)))}, not an "
            "nn.Linear or F.linear whose heads it can mask and slice (a quantized layer: AdaViT needs the float "
            "model)"))
    attention_branch = _branch(block.mid, block.input) if block.mid is not None else None
    position = program.stream.index(block.mid) if block.mid in program.stream else -1
    mlp_add = program.stream[position + 1] if 0 <= position < len(program.stream) - 1 else None
    mlp_branch = _branch(mlp_add, block.mid) if mlp_add is not None and block.mid in mlp_add.args[:2] else None
    if attention_branch is None or mlp_branch is None:
        raise refuse("it is not a pre-norm block (x + attention(x), then x + mlp(x))")
    linears, todo, seen = set(), [block.mid], set()
    while todo:
        node = todo.pop()
        for user in node.users:
            if user is mlp_add or user in seen:
                continue
            seen.add(user)
            (linears.add if is_linear(gm, user) else todo.append)(user)
    inputs = {node.args[0] for node in linears}
    if len(inputs) != 1:
        starts = ", ".join(sorted(str(node.target) if node.op == "call_module" else node.name for node in linears))
        raise refuse(f"its MLP does not start with linear layers on one input (it starts with {starts}: an adapter "
                     "beside a layer, such as LoRA's, is merged into it first, e.g. by peft's merge_and_unload())")
    return BlockParts(q_linear.args[0], attention_branch, mlp_add, mlp_branch, inputs.pop())


def _multiply(gm: fx.GraphModule, block: Block, node: fx.Node, factor: fx.Node, name: str,
              users: Callable[[fx.Node], bool] | None = None, op: Callable = operator.mul) -> fx.Node:
    """Insert ``op(node, factor)`` (``node · factor``) after both and make ``node``'s users (those ``users``
    selects) read it."""
    after = max(node, factor, key=graph_order(gm))
    product = insert_call(gm, after, op, (node, factor), {}, block, name)
    node.replace_all_uses_with(product, delete_user_cb=lambda u: u is not product and (users is None or users(u)))
    return product


def _emit(gm: fx.GraphModule, value: fx.Node, key: str, like: fx.Node | None) -> fx.Node:
    """Emit ``value`` under ``key``, collected in the dtype of ``like`` (None: its own)."""
    with gm.graph.inserting_after(value):
        return gm.graph.call_function(emit, (value, key) if like is None else (value, key, like))


@dataclasses.dataclass(frozen=True)
class Decisions:
    """The nodes of one block's decisions: every row's ``[B, N, 1]``; with head and sub-layer decisions, the heads'
    ``[B, H]``, the sub-layers' ``[B, 2]`` and the heads' factors on head tensors ``[B, H, 1, 1]`` and on channels
    ``[B, 1, C]``."""

    rows: fx.Node
    heads: fx.Node | None = None
    sublayers: fx.Node | None = None
    per_head: fx.Node | None = None
    channels: fx.Node | None = None


def _decision(gm: fx.GraphModule, block: Block, policy: AdaViT, kind: str, source: fx.Node, gate: Callable,
              count: int, after: fx.Node | None = None) -> fx.Node:
    """``block``'s decisions of ``kind`` ``[B, count]`` by ``gate`` from the decision head reading ``source`` (``[B,
    C]``, or ``[B, N, C]`` for tokens: ``[B, N, 1]``), inserted after ``after`` (None: ``source``; training samples
    its noise in the order of the decisions); ones when ``policy`` does not decide ``kind``."""
    after = source if after is None else after
    if kind not in policy.decides:
        return insert_call(gm, after, every_one, (source, count), {}, block, f"{kind}_all_used")
    logits = insert_module(gm, after, block, kind, (source,))
    threshold = {"heads": HEAD_THRESHOLD, "sublayers": SUBLAYER_THRESHOLD, "tokens": TOKEN_THRESHOLD}[kind]
    return insert_call(gm, logits, gate, (logits, threshold), {}, block, f"{kind[:-1]}_decisions")


def decide(gm: fx.GraphModule, program: TokenProgram, block: Block, policy: AdaViT, parts: BlockParts,
           gate: Callable) -> Decisions:
    """Insert ``block``'s decision heads and their decisions by ``gate`` (:func:`gumbel_gate` in training,
    :func:`threshold_gate` at evaluation, :func:`threshold_mask` where the graph only selects with them), and emit
    them as 0/1 in the model's dtype (those of a kind not decided too: all used)."""
    prefix = program.prefix_tokens
    like = block.input if gate is threshold_mask else None
    patches = insert_call(gm, parts.attention_input, operator.getitem,
                          (parts.attention_input, (slice(None), slice(prefix, None))), {}, block, "patches")
    decided = _decision(gm, block, policy, "tokens", patches, gate, 1)
    rows = insert_call(gm, decided, token_gate, (decided, prefix), {}, block, "row_decisions")
    _emit(gm, insert_call(gm, rows, operator.getitem, (rows, (Ellipsis, 0)), {}, block, "row_usage"),
          f"{TOKENS_KEY}{block.name}", like)
    kinds = policy.decided_in(block.index)
    if "heads" not in kinds and "sublayers" not in kinds:
        return Decisions(rows)
    token = insert_call(gm, block.input, operator.getitem, (block.input, (slice(None), 0)), {}, block, "class_token")
    heads = _decision(gm, block, policy, "heads", token, gate, block.attention.num_heads)
    sublayers = _decision(gm, block, policy, "sublayers", token, gate, 2, after=heads)
    _emit(gm, heads, f"{HEADS_KEY}{block.name}", like)
    _emit(gm, sublayers, f"{SUBLAYERS_KEY}{block.name}", like)
    per_head = insert_call(gm, sublayers, head_gate, (heads,), {}, block, "head_factor")
    channels = insert_call(gm, per_head, channel_gate, (heads, block.attention.head_dim), {}, block, "channel_factor")
    return Decisions(rows, heads, sublayers, per_head, channels)


def _gate_heads(gm: fx.GraphModule, block: Block, parts: BlockParts, decisions: Decisions) -> None:
    """Zero the q, k, v and output channels of the heads an image does not use, and their MLP-input channels."""
    site = block.attention
    for name, node in (("q", site.q), ("k", site.k), ("v", site.v), ("heads", site.output)):
        _multiply(gm, block, node, decisions.per_head, f"gated_{name}")
    _multiply(gm, block, parts.mlp_input, decisions.channels, "gated_mlp_input",
              users=lambda u: is_linear(gm, u) and u.args[0] is parts.mlp_input)


def _set_attention_mask(gm: fx.GraphModule, block: Block, mask: fx.Node) -> None:
    """Apply the boolean ``mask`` ``[B, 1, N, N]`` to ``block``'s attention, beside the mask it has."""
    site = block.attention
    if site.kind == "sdpa":
        existing = sdpa_arguments(site.node)["attn_mask"]
        after = max([mask] + ([existing] if isinstance(existing, fx.Node) else []), key=graph_order(gm))
        combined = insert_call(gm, after, combine_masks, (existing, mask), {}, block, "attn_mask")
        if len(site.node.args) > 3:
            site.node.update_arg(3, combined)
        else:
            site.node.update_kwarg("attn_mask", combined)
        return
    logits = site.node.args[0]
    masked = insert_call(gm, max(logits, mask, key=graph_order(gm)), mask_logits, (logits, mask), {}, block,
                         "masked_logits")
    site.node.replace_input_with(logits, masked)


def mask_unused(gm: fx.GraphModule, block: Block, parts: BlockParts, decisions: Decisions) -> None:
    """The official semantics: every head, row and sub-layer is computed and the unused ones are masked."""
    rows = decisions.rows
    _set_attention_mask(gm, block, insert_call(gm, rows, usage_mask, (rows,), {}, block, "usage_mask"))
    attention_factor, mlp_factor = rows, rows
    if decisions.heads is not None:
        _gate_heads(gm, block, parts, decisions)
        attention_factor = insert_call(gm, rows, sublayer_gate, (rows, decisions.sublayers, 0), {}, block,
                                       "attention_factor")
        mlp_factor = insert_call(gm, attention_factor, sublayer_gate, (rows, decisions.sublayers, 1), {}, block,
                                 "mlp_factor")
    _multiply(gm, block, parts.attention_branch, attention_factor, "gated_attention", users=lambda u: u is block.mid)
    _multiply(gm, block, parts.mlp_branch, mlp_factor, "gated_mlp", users=lambda u: u is parts.mlp_add)


def _used_layout(gm: fx.GraphModule, block: Block, decisions: Decisions, which: int,
                 name: str) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(images, index, valid) of the rows that use sub-layer ``which`` (0: attention, 1: MLP)."""
    after = max(decisions.rows, decisions.sublayers or decisions.rows, key=graph_order(gm))
    layout = insert_call(gm, after, used_layout, (decisions.rows, decisions.sublayers, which), {}, block,
                         f"{name}_layout")
    return unpack(gm, layout, block, (f"{name}_images", f"{name}_index", f"{name}_valid"))


def _select_used_heads(gm: fx.GraphModule, block: Block, per_head: fx.Node) -> fx.Node:
    """Let ``block``'s SDPA call compute only the heads some image uses (the others' outputs are zeros)."""
    site = block.attention
    heads = insert_call(gm, per_head, used_heads, (per_head,), {}, block, "used_heads")
    for name, node in zip("qkv", site.node.args[:3]):  # the gated q, k, v
        selected = insert_call(gm, max(node, heads, key=graph_order(gm)), select_heads, (node, heads), {}, block,
                               f"used_{name}")
        site.node.replace_input_with(node, selected)
    placed = insert_call(gm, site.node, place_heads, (site.node, heads, site.num_heads), {}, block, "placed_heads")
    site.node.replace_all_uses_with(placed, delete_user_cb=lambda user: user is not placed)
    return heads


def _slice_used_heads(gm: fx.GraphModule, block: Block, parts: BlockParts, decisions: Decisions,
                      layout: HeadLayout, after: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Compute q, k, v, the output projection and the MLP's first layer for the heads some image uses only, from
    those rows and columns of their weights; each image's unused heads among them still give zeros. Returns the
    used heads' node and the per-image factors the sub-layers read. The projections come after ``after``; q, k and
    v made by one linear layer are projected together. Where every image uses every one of those heads (always at
    batch 1) there are no factors."""
    site, head_dim = block.attention, block.attention.head_dim
    used = insert_call(gm, decisions.channels, used_heads, (decisions.per_head,), {}, block, "used_heads")
    varying = insert_call(gm, used, varying_heads, (decisions.heads, used), {}, block, "varying_heads")
    factor = insert_call(gm, varying, head_gate, (varying,), {}, block, "used_head_factor")
    channels = insert_call(gm, factor, channel_gate, (varying, head_dim), {}, block, "used_channel_factor")
    by_layer: dict[fx.Node, list[int]] = {}
    for position, head_input in enumerate(layout.inputs):
        by_layer.setdefault(head_input.linear, []).append(position)
    for linear, positions in by_layer.items():
        weight, bias = linear_parameters(gm, linear)
        source, names = linear.args[0], ["qkv"[position] for position in positions]
        tables = tuple(layout.inputs[position].channels for position in positions)
        read = [source, channels, after, *(value for value in (weight, bias) if value is not None)]
        joint = insert_call(gm, max(read, key=graph_order(gm)), project_heads, (source, weight, bias, tables, used),
                            {}, block, f"used_{''.join(names)}")
        for position, name, projected in zip(positions, names, unpack(gm, joint, block, tuple(
                f"used_{name}" for name in names))):
            gated = _multiply(gm, block, projected, factor, f"gated_{name}", op=apply_factor)
            layout.inputs[position].node.replace_all_uses_with(gated, delete_user_cb=layout.attention.__contains__)
    projection, columns = layout.output
    weight, bias = linear_parameters(gm, projection)
    gated = insert_call(gm, site.output, apply_factor, (site.output, factor), {}, block, "gated_heads")
    output = insert_call(gm, gated, project_from_heads, (gated, weight, bias, columns, used), {}, block,
                         "used_projection")
    projection.replace_all_uses_with(output)
    factors = [factor, channels]
    for first in [user for user in parts.mlp_input.users if is_linear(gm, user)]:
        if not has_parameters(gm, first):  # its weight is computed from the input: zero the channels instead
            _multiply(gm, block, parts.mlp_input, decisions.channels, "gated_mlp_input",
                      users=functools.partial(operator.is_, first))
            factors.append(decisions.channels)
            continue
        weight, bias = linear_parameters(gm, first)
        sliced = insert_call(gm, first, project_head_channels, (parts.mlp_input, weight, bias, used, head_dim,
                             channels), {}, block, "used_mlp_input")
        first.replace_all_uses_with(sliced, delete_user_cb=functools.partial(operator.is_not, sliced))
    return used, factors


def _after_sized_stream(gm: fx.GraphModule, block: Block) -> bool:
    """Whether a block before ``block`` gives rows sizes (merges or pads tokens)."""
    return any(
        (found := tag_of(node)) is not None and found.role is Role.STREAM and found.block < block.index
        and getattr(op_of(node.target), "sized", False) for node in gm.graph.nodes
    )


def _terms_at_used_rows(gm: fx.GraphModule, program: TokenProgram, block: Block, images: fx.Node,
                        index: fx.Node) -> set[fx.Node]:
    """Make the readers of ``block``'s position terms (rotary tables, a relative position bias) read them at the
    positions of the attention's used rows (``images``, ``index``; their positions in the first block's input, after
    any earlier reduction). Returns the nodes that take them, which are in the used layout already."""
    if not block.position_terms:
        return set()
    rows = read_state(gm, block, POSITIONS)  # [B, N, 1]: taken into the used layout as the sub-layer's inputs are
    of_images = insert_call(gm, max(rows, images, key=graph_order(gm)), batch_rows, (rows, images), {}, block,
                            "used_images_positions")
    positions = insert_call(gm, max(of_images, index, key=graph_order(gm)), take_rows, (of_images, index, 1), {},
                            block, "used_positions")
    return set(place_terms(gm, program, block, positions, images))


def _one_row_without_heads(gm: fx.GraphModule, block: Block, used: fx.Node | None, layout: tuple[fx.Node, ...],
                           entry: fx.Node, exit: fx.Node, outside: set[fx.Node]) -> tuple[fx.Node, ...]:
    """The layout to compute the sub-layer from ``entry`` to ``exit`` on, used in ``layout``: one row when no image
    uses a head (:func:`one_row_without_heads`), where every way from ``entry`` to ``exit`` goes through a product of
    the used heads (then its rows give one result, the bias, for every row, as a row-wise MLP after it does), else
    ``layout`` itself. ``used``: the heads some image uses (None: not decided); ``outside``: the values the
    sub-layer reads that are not computed in it."""
    sliced = (project_heads, project_head_channels)
    inside = set(sublayer_nodes(gm, entry, exit, ancestors([*layout, *outside])))
    reached = reachable([entry], lambda node: () if node.target in sliced else
                        [user for user in node.users if user in inside])
    if used is None or exit in reached or not any(node.target in sliced for node in inside):
        return layout
    after = max(used, *layout, key=graph_order(gm))
    one = insert_call(gm, after, one_row_without_heads, (used, *layout), {}, block, "one_row")
    return unpack(gm, one, block, tuple(f"one_row_{name}" for name in ("images", "index", "valid")))


def skip_unused(gm: fx.GraphModule, program: TokenProgram, block: Block, policy: AdaViT, parts: BlockParts,
                decisions: Decisions) -> None:
    """Compute only what is used: each sub-layer on the images that use it and, in each, on its used rows; the
    attention on the heads some image of the batch uses (the others' outputs are zeros)."""
    if _after_sized_stream(gm, block):
        raise UnsupportedModelError(
            f"{program.model_name}: AdaViT cannot skip the unused parts of {block.name}: an earlier block merges or "
            "pads tokens, and their sizes weight its attention; use AdaViT(..., skip=False), which masks them"
        )
    site = block.attention
    sliced = head_layout(gm, block) if decisions.heads is not None else None  # read before the block changes
    images, index, valid = _used_layout(gm, block, decisions, 0, "attention")
    ready: set[fx.Node] = _terms_at_used_rows(gm, program, block, images, index)
    original_mask = sdpa_arguments(site.node)["attn_mask"] if site.kind == "sdpa" else None
    per_image = {original_mask: (2, 3)} if isinstance(original_mask, fx.Node) else {}
    head_inputs: dict[fx.Node, tuple[int, ...]] = {}
    used = None  # the heads the attention computes, where it computes some only
    if decisions.heads is not None:
        if sliced is None:
            _gate_heads(gm, block, parts, decisions)
            if site.kind == "sdpa":
                used = _select_used_heads(gm, block, decisions.per_head)
            head_inputs = {decisions.per_head: (), decisions.channels: ()}
        else:
            used, factors = _slice_used_heads(gm, block, parts, decisions, sliced, after=valid)
            head_inputs = dict.fromkeys(factors, ())
    if used is not None:
        ready.add(used)
        if isinstance(original_mask, fx.Node):  # a bias per head (relative position): at the computed heads
            at_heads = insert_call(gm, max(original_mask, used, key=graph_order(gm)), mask_at_heads,
                                   (original_mask, used, site.num_heads), {}, block, "mask_heads")
            site.node.replace_input_with(original_mask, at_heads)
            if original_mask in ready:
                ready.add(at_heads)
            else:
                per_image = {at_heads: (2, 3)}
    branch = _branch(block.mid, block.input)  # after head slicing, which may have replaced the branch's last node
    layout = images, index, valid
    computed = _one_row_without_heads(gm, block, used, layout, parts.attention_input, branch, ready | set(
        head_inputs)) if not block.position_terms and not per_image else layout
    keys = insert_call(gm, computed[2], valid_keys, (computed[2],), {}, block, "valid_keys")
    _set_attention_mask(gm, block, keys)
    decided = ancestors([*layout, *computed, *ready, *head_inputs])
    nodes = sublayer_nodes(gm, parts.attention_input, branch, decided)
    mid = run_on_used(gm, block, nodes, parts.attention_input, block.mid, *layout, {**per_image, **head_inputs},
                      ready | {*computed[1:], keys}, program.batch, "attention", computed)
    layout = _used_layout(gm, block, decisions, 1, "mlp")
    computed = _one_row_without_heads(gm, block, used, layout, mid, parts.mlp_branch, ready | set(head_inputs))
    nodes = sublayer_nodes(gm, mid, parts.mlp_branch, ancestors([*layout, *computed, *ready, *head_inputs]))
    run_on_used(gm, block, nodes, mid, parts.mlp_add, *layout, head_inputs, ready | set(computed[1:]),
                program.batch, "mlp", computed)
    if "sublayers" in policy.decided_in(block.index):
        mark_skippable(block.name, decisions.sublayers, parts.mlp_add)


def gate_block(gm: fx.GraphModule, program: TokenProgram, block: Block, policy: AdaViT, train: bool) -> Rewrite:
    """Decide the usage of ``block``'s heads, sub-layers and patch tokens, and apply it (see the module
    docstring): masked in training and with ``skip=False``, skipped otherwise."""
    parts = block_parts(gm, program, block, policy.method)
    skip = policy.skip and not train
    decisions = decide(gm, program, block, policy, parts, gumbel_gate if train else threshold_mask if skip
                       else threshold_gate)
    if not skip:
        mask_unused(gm, block, parts, decisions)
    else:
        skip_unused(gm, program, block, policy, parts, decisions)
    return Rewrite()


def gate_for_evaluation(gm: fx.GraphModule, program: TokenProgram, block: Block, policy: AdaViT) -> Rewrite:
    """Evaluation: the decisions are ``sigmoid(logit) > threshold``; unused parts skipped (``skip=False``:
    masked)."""
    return gate_block(gm, program, block, policy, train=False)


def gate_for_training(gm: fx.GraphModule, program: TokenProgram, block: Block, policy: AdaViT) -> Rewrite:
    """Training: the decisions are hard Gumbel-sigmoid samples (τ = 5, straight-through), applied as masks."""
    return gate_block(gm, program, block, policy, train=True)


def _linear(dim: int, out: int, init_logit: float | None) -> nn.Linear:
    layer = nn.Linear(dim, out)
    if init_logit is None:
        nn.init.trunc_normal_(layer.weight, std=0.02)
        nn.init.zeros_(layer.bias)
    else:
        nn.init.zeros_(layer.weight)
        nn.init.constant_(layer.bias, init_logit)
    return layer


def _decision_heads(policy: AdaViT, block: Block, program: TokenProgram) -> dict[str, Any]:
    outputs = {"heads": block.attention.num_heads, "sublayers": 2, "tokens": 1}
    return {kind: _linear(program.dim, outputs[kind], policy.init_logit) for kind in policy.decided_in(block.index)}


SHIPPED_USAGES = (0.7, 0.5)
_OFFICIAL = {"head_select.mlp_head": "heads", "layer_select.mlp_head": "sublayers",
             "attn.token_select.mlp_head": "tokens"}  # official key infix → decision head


def weights_file(policy: AdaViT) -> str | None:
    """The file ``policy.weights`` names: a path, or, for ``"digits"``, the shipped state for its usage (the digits
    ViT's backbone fine-tuned with the decision heads of the official blocks, ``layers=None``)."""
    if policy.weights != SHIPPED:
        return policy.weights
    offered = policy.usage in SHIPPED_USAGES and policy.decides == DECIDED and \
        (policy.layers is None or policy.token_only == (0,))
    name = f"adavit_digits_usage{round(100 * policy.usage)}.pt" if offered else None
    return shipped(name, policy.describe(), f"usages {', '.join(map(str, SHIPPED_USAGES))} at layers=None "
                   "(the official blocks) of the digits ViT")


def official_heads(saved: dict, names: list[str]) -> dict[str, Tensor] | None:
    """The decision heads of an official AdaViT checkpoint (``{"model": state}`` or the state itself, with
    ``blocks.<i>.head_select.mlp_head.*``, ``blocks.<i>.layer_select.mlp_head.*`` and
    ``blocks.<i>.attn.token_select.mlp_head.*``) under ``names`` (``<block>.heads`` etc., in block order); None when
    it has none. Its backbone is read by :func:`official_backbone`."""
    state = saved.get("model", saved)
    found: dict[str, dict[int, dict[str, Tensor]]] = {kind: {} for kind in _OFFICIAL.values()}
    for key, value in state.items():
        for infix, kind in _OFFICIAL.items():
            head, _, rest = key.partition(f".{infix}.")
            if rest and head.startswith("blocks.") and head[len("blocks."):].isdigit():
                found[kind].setdefault(int(head[len("blocks."):]), {})[rest] = value
    if not any(found.values()):
        return None
    translated = {}
    for kind, by_block in found.items():
        ours = [name for name in names if name.endswith(f".{kind}")]
        for position, block in enumerate(sorted(by_block)):
            name = ours[position] if position < len(ours) else f"blocks_{block}.{kind}"  # one this policy lacks
            translated.update({f"{name}.{rest}": value for rest, value in by_block[block].items()})
    return translated


def official_backbone(saved: dict) -> dict[str, Tensor]:
    """The backbone of an official AdaViT checkpoint as a timm ``VisionTransformer`` state: each block's
    ``attn.query``/``key``/``value`` joined into ``attn.qkv``, the decision heads left out."""
    state = saved.get("model", saved)
    backbone = {key: value for key, value in state.items() if not any(f".{infix}." in key for infix in _OFFICIAL)}
    for key in [k for k in backbone if ".attn.query." in k]:
        stem, _, leaf = key.partition(".attn.query.")
        parts = [backbone.pop(f"{stem}.attn.{name}.{leaf}") for name in ("query", "key", "value")]
        backbone[f"{stem}.attn.qkv.{leaf}"] = torch.cat(parts)
    return backbone


@torch.no_grad()
def set_usage(
    gm: nn.Module, images: Tensor, usage: float | Mapping[str, float], parts: tuple[str, ...] = DECIDED, seed: int = 0
) -> None:
    """Set the decision heads of ``gm`` (transformed with AdaViT) to a random usage: about ``usage`` of each kind in
    ``parts`` used, all of the others (``usage`` a mapping: its share for each kind it names, all of the others).
    Heads and sub-layers: ``round(share · count)`` of all the model's heads (of all its sub-layers) chosen at
    random, the same for every image; rows: token heads with random weights whose bias lets that share of the
    patch rows of ``images`` pass (the bias midway between the last row that passes and the first that does not),
    block after block, so each image uses different rows. The random-usage
    baseline, and a way to time skipping at a usage without training."""
    shares = dict(usage) if isinstance(usage, Mapping) else dict.fromkeys(parts, usage)
    generator = torch.Generator().manual_seed(seed)
    for kind in ("heads", "sublayers"):
        heads = _heads_of_kind(gm, kind)
        sizes = [head.bias.numel() for head in heads]
        used = torch.zeros(sum(sizes))
        used[torch.randperm(len(used), generator=generator)[: round(shares.get(kind, 1.0) * len(used))]] = 1.0
        for head, bias in zip(heads, (20.0 * used - 10.0).split(sizes)):
            head.weight.zero_()
            head.bias.copy_(bias)
    threshold = math.log(TOKEN_THRESHOLD / (1.0 - TOKEN_THRESHOLD))
    for head in _heads_of_kind(gm, "tokens"):
        head.weight.zero_()
        head.bias.fill_(10.0)
    if "tokens" not in shares:
        return
    for head in _heads_of_kind(gm, "tokens"):  # block after block: a block's input depends on the earlier ones
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) / math.sqrt(head.weight.shape[1]))
        seen: list[Tensor] = []
        hook = head.register_forward_hook(lambda module, args, out, seen=seen: seen.append(out.flatten()))
        with collect():  # every block decides its rows, also one whose sub-layers no image uses
            gm(images)
        hook.remove()
        head.bias.fill_(threshold - _cut(torch.cat(seen) - head.bias, shares["tokens"]))


def _cut(values: Tensor, share: float) -> float:
    """A value that ``round(share · n)`` of the ``n`` ``values`` exceed, midway between the two values it separates
    (a rounding of another CPU's kernels does not move a value across it)."""
    ordered, passing = values.sort().values, round(share * values.numel())
    if passing == 0:
        return ordered[-1].item() + 1.0
    if passing == values.numel():
        return ordered[0].item() - 1.0
    return (ordered[-passing - 1].item() + ordered[-passing].item()) / 2


def _heads_of_kind(gm: nn.Module, kind: str) -> list[nn.Linear]:
    """``gm``'s decision heads of ``kind`` (``heads``, ``sublayers`` or ``tokens``), in block order."""
    return [module for name, module in gm.named_modules()
            if name.startswith(f"{LEARNED_PREFIX}.") and name.endswith(f".{kind}")]


def _loss(teacher: nn.Module, policy: AdaViT, distill_weight: float | None, example_inputs) -> nn.Module:
    from ..losses import AdaViTLoss

    return AdaViTLoss(teacher, policy, distill_weight=0.0 if distill_weight is None else distill_weight)


register_method(
    "adavit", AdaViT, needs_class_token=True, reduces_tokens=False, adaptive=True,
    learned=Learned(_decision_heads, gate_for_training, weights=weights_file, translate=official_heads,
                    loss=_loss, backbone_lr_scale=1.0),
    identity=lambda layers: AdaViT(1.0, layers, init_logit=20.0),
    example=lambda layers: AdaViT(0.5, layers, skip=False),
)(gate_for_evaluation)
