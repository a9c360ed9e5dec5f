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
import operator
from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch import nn

from ..analysis import Block, TokenProgram, sdpa_arguments
from ..errors import PolicyError, UnsupportedModelError
from ..ops.gating import (
    channel_gate,
    combine_masks,
    gumbel_gate,
    head_gate,
    sublayer_gate,
    threshold_gate,
    token_gate,
    usage_mask,
)
from ..ops.scoring import with_attn_mask
from ..passes.common import Rewrite, insert_call
from ..passes.learned import emit, insert_module
from ..policies import Policy, check_layers, option, parse_layers, parse_number, parse_text
from .registry import Learned, register_method

__all__ = ["AdaViT", "HEADS_KEY", "SUBLAYERS_KEY", "TOKENS_KEY", "BlockParts", "block_parts"]

HEADS_KEY = "adavit/heads/"  # + block name: the heads' decisions [B, H]
SUBLAYERS_KEY = "adavit/sublayers/"  # + block name: the sub-layers' decisions [B, 2] (attention, MLP)
TOKENS_KEY = "adavit/tokens/"  # + block name: every row's decision [B, N] (prefix rows 1)
HEAD_THRESHOLD, SUBLAYER_THRESHOLD, TOKEN_THRESHOLD = 0.5, 0.5, 0.6


@dataclasses.dataclass(frozen=True)
class AdaViT(Policy):
    """AdaViT (Meng et al., CVPR 2022): learned per-image usage of heads, sub-layers and patch tokens.

    ``usage``: the target usage γ of the training loss. ``layers``: the blocks with all three decision heads
    (None: every block but the first, and token decisions in the first too, as the official code). ``weights``: a
    file of trained decision heads (``fxprune.save_weights``; with a fine-tuned backbone too); None: untrained,
    which the plan says. ``init_logit``: None for the official initialisation (weights truncated-normal, std
    0.02, biases 0); a number starts every decision head at that constant logit (zero weights), e.g. a large one
    for a model that starts dense.
    """

    usage: float = option(parse_number)
    layers: tuple[int, ...] | None = option(parse_layers, default=None)
    weights: str | None = option(parse_text, default=None)
    init_logit: float | None = option(parse_number, "init", default=None)
    token_only: tuple[int, ...] = dataclasses.field(default=(), repr=False)  # blocks with token decisions only

    def __post_init__(self) -> None:
        if not isinstance(self.usage, (int, float)) or not 0.0 < self.usage <= 1.0:
            raise PolicyError(f"AdaViT.usage must be in (0, 1], got {self.usage!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", check_layers(self.layers, "AdaViT"))

    def bind(self, depth: int, patches: int | None = None) -> AdaViT:
        if self.layers is not None:
            return self
        return dataclasses.replace(self, layers=tuple(range(depth)), token_only=(0,))

    def tokens_out(self, tokens_in: int, prefix: int, layer: int) -> int:
        return tokens_in

    def describe(self) -> str:
        return f"{self.method} usage {self.usage:g}" + ("" if self.weights else " (untrained)")

    def action(self, layer: int) -> str:
        what = "patches" if layer in self.token_only else "heads, sub-layers, patches"
        return f"{self.describe()}: {what} decided per image"

    def plan_notes(self) -> list[str]:
        notes = [f"{self.method}: token counts and MACs are the dense model's; usage is decided per image"]
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


def _is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Linear)
    return node.op == "call_function" and node.target is nn.functional.linear


def _branch(add: fx.Node, residual: fx.Node) -> fx.Node | None:
    """The operand of the residual ``add`` that is not ``residual``."""
    others = [arg for arg in add.args[:2] if arg is not residual]
    return others[0] if len(others) == 1 and isinstance(others[0], fx.Node) else None


def block_parts(gm: fx.GraphModule, program: TokenProgram, block: Block, what: str) -> BlockParts:
    """Find :class:`BlockParts` of ``block`` structurally; raises :class:`~fxprune.UnsupportedModelError` naming the
    block and the part ``what`` (the method) could not find."""

    def refuse(reason: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{what} cannot rewrite {block.name}: {reason}; leave it out of layers=")

    site = block.attention
    shapes = [getattr(node.meta.get("val"), "shape", None) if node is not None else None for node in (site.k, site.v)]
    if any(shape is None or len(shape) != 4 or shape[1] != site.num_heads for shape in shapes):
        raise refuse("its keys and values are not one per query head")
    q_linear = site.q
    while q_linear is not None and not _is_linear(gm, q_linear):
        q_linear = next((a for a in q_linear.args if isinstance(a, fx.Node)), None)
    if q_linear is None:
        raise refuse("no linear layer makes its queries")
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
            (linears.add if _is_linear(gm, user) else todo.append)(user)
    inputs = {node.args[0] for node in linears}
    if len(inputs) != 1:
        raise refuse("its MLP does not start with linear layers on one input")
    return BlockParts(q_linear.args[0], attention_branch, mlp_add, mlp_branch, inputs.pop())


def _multiply(gm: fx.GraphModule, block: Block, node: fx.Node, factor: fx.Node, name: str,
              users: Callable[[fx.Node], bool] | None = None) -> fx.Node:
    """Insert ``node · factor`` after both and make ``node``'s users (those ``users`` selects) read it."""
    after = max(node, factor, key=_order(gm))
    product = insert_call(gm, after, operator.mul, (node, factor), {}, block, name)
    node.replace_all_uses_with(product, delete_user_cb=lambda u: u is not product and (users is None or users(u)))
    return product


def _order(gm: fx.GraphModule) -> Callable[[fx.Node], int]:
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    return position.__getitem__


def _decide(gm: fx.GraphModule, block: Block, logits: fx.Node, threshold: float, train: bool, name: str) -> fx.Node:
    gate = (gumbel_gate, (logits, threshold)) if train else (threshold_gate, (logits, threshold))
    return insert_call(gm, logits, gate[0], gate[1], {}, block, name)


def _emit(gm: fx.GraphModule, value: fx.Node, key: str) -> fx.Node:
    with gm.graph.inserting_after(value):
        return gm.graph.call_function(emit, (value, key))


def _mask_attention(gm: fx.GraphModule, block: Block, rows: fx.Node) -> None:
    """Let a row that is not used be no key for the others and attend to itself only."""
    site = block.attention
    mask = insert_call(gm, rows, usage_mask, (rows,), {}, block, "usage_mask")
    if site.kind == "sdpa":
        existing = sdpa_arguments(site.node)["attn_mask"]
        combined = insert_call(gm, mask, combine_masks, (existing, mask), {}, block, "attn_mask")
        if len(site.node.args) > 3:
            site.node.update_arg(3, combined)
        else:
            site.node.update_kwarg("attn_mask", combined)
        return
    logits = site.node.args[0]
    after = max(logits, mask, key=_order(gm))
    masked = insert_call(gm, after, with_attn_mask, (logits, mask), {}, block, "masked_logits")
    site.node.replace_input_with(logits, masked)


def gate_block(gm: fx.GraphModule, program: TokenProgram, block: Block, policy: AdaViT, train: bool) -> Rewrite:
    """Decide and apply the usage of ``block``'s heads, sub-layers and patch tokens (see the module docstring)."""
    parts = block_parts(gm, program, block, policy.method)
    prefix, site = program.prefix_tokens, block.attention
    patches = insert_call(gm, parts.attention_input, operator.getitem,
                          (parts.attention_input, (slice(None), slice(prefix, None))), {}, block, "patches")
    token_logits = insert_module(gm, patches, block, "tokens", (patches,))
    decided = _decide(gm, block, token_logits, TOKEN_THRESHOLD, train, "token_decisions")
    rows = insert_call(gm, decided, token_gate, (decided, prefix), {}, block, "row_decisions")
    _emit(gm, insert_call(gm, rows, operator.getitem, (rows, (Ellipsis, 0)), {}, block, "row_usage"),
          f"{TOKENS_KEY}{block.name}")
    _mask_attention(gm, block, rows)
    attention_factor, mlp_factor = rows, rows
    if block.index not in policy.token_only:
        token = insert_call(gm, block.input, operator.getitem, (block.input, (slice(None), 0)), {}, block,
                            "class_token")
        head_logits = insert_module(gm, token, block, "heads", (token,))
        heads = _decide(gm, block, head_logits, HEAD_THRESHOLD, train, "head_decisions")
        layer_logits = insert_module(gm, heads, block, "sublayers", (token,))
        sublayers = _decide(gm, block, layer_logits, SUBLAYER_THRESHOLD, train, "sublayer_decisions")
        _emit(gm, heads, f"{HEADS_KEY}{block.name}")
        _emit(gm, sublayers, f"{SUBLAYERS_KEY}{block.name}")
        per_head = insert_call(gm, sublayers, head_gate, (heads,), {}, block, "head_factor")
        for name, node in (("q", site.q), ("k", site.k), ("v", site.v), ("heads", site.output)):
            _multiply(gm, block, node, per_head, f"gated_{name}")
        channels = insert_call(gm, per_head, channel_gate, (heads, site.head_dim), {}, block, "channel_factor")
        _multiply(gm, block, parts.mlp_input, channels, "gated_mlp_input",
                  users=lambda u: _is_linear(gm, u) and u.args[0] is parts.mlp_input)
        attention_factor = insert_call(gm, rows, sublayer_gate, (rows, sublayers, 0), {}, block, "attention_factor")
        mlp_factor = insert_call(gm, attention_factor, sublayer_gate, (rows, sublayers, 1), {}, block, "mlp_factor")
    _multiply(gm, block, parts.attention_branch, attention_factor, "gated_attention",
              users=lambda u: u is block.mid)
    _multiply(gm, block, parts.mlp_branch, mlp_factor, "gated_mlp", users=lambda u: u is parts.mlp_add)
    return Rewrite()


def gate_for_evaluation(gm: fx.GraphModule, program: TokenProgram, block: Block, policy: AdaViT) -> Rewrite:
    """Evaluation: the decisions are ``sigmoid(logit) > threshold``."""
    return gate_block(gm, program, block, policy, train=False)


def gate_for_training(gm: fx.GraphModule, program: TokenProgram, block: Block, policy: AdaViT) -> Rewrite:
    """Training: the decisions are hard Gumbel-sigmoid samples (τ = 5, straight-through)."""
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
    heads = {"tokens": _linear(program.dim, 1, policy.init_logit)}
    if block.index not in policy.token_only:
        heads["heads"] = _linear(program.dim, block.attention.num_heads, policy.init_logit)
        heads["sublayers"] = _linear(program.dim, 2, policy.init_logit)
    return heads


def _loss(teacher: nn.Module, policy: AdaViT, distill_weight: float | None, example_inputs) -> nn.Module:
    from ..losses import AdaViTLoss

    return AdaViTLoss(teacher, policy, distill_weight=0.0 if distill_weight is None else distill_weight)


register_method(
    "adavit", AdaViT, needs_class_token=True, reduces_tokens=False,
    learned=Learned(_decision_heads, gate_for_training, loss=_loss, backbone_lr_scale=1.0),
    identity=lambda layers: AdaViT(1.0, layers, init_logit=20.0),
    example=lambda layers: AdaViT(0.5, layers),
)(gate_for_evaluation)
