"""``einsum`` canonicalisation: a graph pass that writes each two-operand ``einsum`` that is a batched matrix
product (``torch.einsum("bhid,bhjd->bhij", q, k)``, einops' ``einsum(q, k, "b h i d, b h j d -> b h i j")``) as
``q @ kᵀ`` or ``a @ v``, so that the attention passes see it like any other attention."""

from __future__ import annotations

import operator
import sys

import torch
import torch.fx as fx

from .values import propagate


def _axes(term: str, named: bool) -> list[str]:
    """The axis names of one operand or result of an equation: one letter each, or (``named``, einops) separated
    by spaces; an ellipsis ``...`` is one name."""
    if named:
        return term.split()
    head, ellipsis, tail = term.replace(" ", "").partition("...")
    return [*head, *([ellipsis] if ellipsis else []), *tail]


def _operands_and_equation(node: fx.Node) -> tuple[list[fx.Node], str, bool] | None:
    """``(operands, equation, named)`` of an ``einsum`` call (torch's or einops'), or None for any other node."""
    if node.op != "call_function":
        return None
    if node.target is torch.einsum and node.args and isinstance(node.args[0], str):
        operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return list(operands), node.args[0], False
    einops = sys.modules.get("einops")
    if einops is not None and node.target is getattr(einops, "einsum", None) and isinstance(node.args[-1], str):
        return list(node.args[:-1]), node.args[-1], True
    return None


def _as_product(operands: list[fx.Node], equation: str, named: bool) -> bool | None:
    """Whether ``equation`` over two operands is ``a @ bᵀ`` (True) or ``a @ b`` (False) on the same leading axes,
    or None when it is neither. An ellipsis may stand first for leading axes (``...id,...jd->...ij``): einsum then
    broadcasts them from the right, as the matrix product broadcasts its leading axes."""
    if len(operands) != 2 or "->" not in equation:
        return None
    inputs, output = equation.split("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        return None
    a, b, out = _axes(terms[0], named), _axes(terms[1], named), _axes(output, named)
    if len(a) < 3 or not len(a) == len(b) == len(out) or a[:-2] != b[:-2] or a[:-2] != out[:-2]:
        return None
    if len(set(a)) != len(a) or len(set(b)) != len(b) or "..." in a[1:-2]:
        return None
    if a[-1] == b[-1] and out[-2:] == [a[-2], b[-2]] and a[-2] != b[-2]:
        return True
    if a[-1] == b[-2] and out[-2:] == [a[-2], b[-1]] and a[-2] != b[-1]:
        return False
    return None


def canonicalise_einsum(gm: fx.GraphModule) -> int:
    """Canonicalising pass run by :func:`~fxprune.capture.trace`: each two-operand ``einsum`` of ``gm`` that is a
    batched matrix product on the same leading axes becomes ``operator.matmul`` (of the second operand transposed
    where the equation contracts both last axes). Returns how many were; ``gm`` is recompiled and its example values
    propagated again when any was."""
    changed = 0
    for node in list(gm.graph.nodes):
        found = _operands_and_equation(node)
        transposed = None if found is None else _as_product(*found)
        if transposed is None:
            continue
        a, b = found[0]
        with gm.graph.inserting_before(node):
            made = [gm.graph.call_method("transpose", (b, -1, -2))] if transposed else []
            product = gm.graph.call_function(operator.matmul, (a, made[0] if made else b))
        for new in (*made, product):  # in the module of the einsum it replaces
            new.meta.update({key: node.meta[key] for key in ("nn_module_stack", "stack_trace") if key in node.meta})
        node.replace_all_uses_with(product)
        gm.graph.erase_node(node)
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
        propagate(gm)
    return changed
