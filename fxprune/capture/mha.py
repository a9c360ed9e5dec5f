"""``nn.MultiheadAttention`` canonicalisation: a graph pass that decomposes self-attention
``nn.MultiheadAttention`` leaves into ``linear -> SDPA -> linear`` nodes."""

from __future__ import annotations

import inspect
import operator
from typing import TYPE_CHECKING

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import TraceError
from .values import propagate

if TYPE_CHECKING:
    from .tracer import TraceInfo


def _mha_self_attention(x, in_w, in_b, out_w, out_b, num_heads: int, batch_first: bool, dropout_p: float):
    """Self-attention of ``nn.MultiheadAttention`` as primitives, its attention weights dropped with probability
    ``dropout_p`` (in training mode): ``[B, N, C]`` (or ``[N, B, C]``) in and out."""
    if not batch_first:
        x = x.transpose(0, 1)
    B, N, C = x.shape
    qkv = F.linear(x, in_w, in_b).reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p) if dropout_p else \
        F.scaled_dot_product_attention(q, k, v)
    o = F.linear(o.transpose(1, 2).reshape(B, N, C), out_w, out_b)
    if not batch_first:
        o = o.transpose(0, 1)
    return o


def _mha_graph(num_heads: int, batch_first: bool, dropout_p: float) -> fx.Graph:
    def self_attention(x, in_w, in_b, out_w, out_b):
        return _mha_self_attention(x, in_w, in_b, out_w, out_b, num_heads, batch_first, dropout_p)

    return fx.Tracer().trace(self_attention)


_MHA_ARGUMENTS = tuple(inspect.signature(nn.MultiheadAttention.forward).parameters)[1:]  # in order, after self


def _mha_call(node: fx.Node) -> dict[str, object]:
    """The arguments of the call ``node`` of ``nn.MultiheadAttention``, by name (positional ones too)."""
    return {**dict(zip(_MHA_ARGUMENTS, node.args)), **node.kwargs}


def _mha_refusal(mha: nn.MultiheadAttention, node: fx.Node) -> str | None:
    kw = _mha_call(node)
    q, k, v = (kw.get(name) for name in _MHA_ARGUMENTS[:3])
    if not (q is k is v):
        return "it is not self-attention (query, key and value differ)"
    if kw.get("key_padding_mask") is not None or kw.get("attn_mask") is not None:
        return "it is called with a mask"
    if kw.get("is_causal", False):
        return "it is causal"
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        return "it uses separate q/k/v projections, bias_k/bias_v or add_zero_attn"
    return None


def decompose_multihead_attention(gm: fx.GraphModule, info: TraceInfo) -> None:
    """Canonicalising pass run by :func:`~fxprune.capture.trace`: every ``nn.MultiheadAttention`` leaf of ``gm``
    called as plain self-attention becomes ``linear -> SDPA -> linear`` nodes, so that the attention passes see
    it like any other attention (with the module's attention dropout where it is in training mode).

    Decomposed modules are listed in ``info.decomposed``; a module left as a leaf gets a note in ``info.notes``
    saying why. When anything was decomposed, ``gm`` is recompiled and its example values propagated again.
    Raises :class:`~fxprune.TraceError` when the attention weights a decomposed module returns are used.
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
            continue
        mha = gm.get_submodule(node.target)
        why = _mha_refusal(mha, node)
        if why is not None:
            info.notes.append(f"{node.target} (nn.MultiheadAttention) left as a leaf: {why}")
            continue
        sub = _mha_graph(mha.num_heads, mha.batch_first, mha.dropout if mha.training else 0.0)
        with gm.graph.inserting_before(node):
            attrs = [
                gm.graph.get_attr(f"{node.target}.{p}")
                for p in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
            ]
            placeholders = [n for n in sub.nodes if n.op == "placeholder"]
            env = dict(zip(placeholders, [_mha_call(node)["query"], *attrs]))
            out = gm.graph.graph_copy(sub, env)
        _inherit_scope(env, node)
        for user in list(node.users):
            if user.target is operator.getitem and (user.args[1] == 0 or not user.users):
                user.replace_all_uses_with(out)
                gm.graph.erase_node(user)
        if node.users:
            raise TraceError(
                f"{node.target}: the attention weights returned by nn.MultiheadAttention are used; "
                "fxprune decomposes it with need_weights=False only"
            )
        gm.graph.erase_node(node)
        info.decomposed.append(node.target)
    if info.decomposed:
        gm.graph.lint()
        gm.recompile()
        propagate(gm)


def _inherit_scope(env: dict, node: fx.Node) -> None:
    stack = dict(node.meta.get("nn_module_stack", {}))
    for new in env.values():
        cur = new
        while cur is not None and cur.op != "output" and cur is not node:
            if "nn_module_stack" not in cur.meta and cur.op != "placeholder":
                cur.meta["nn_module_stack"] = stack
            cur = cur.next
