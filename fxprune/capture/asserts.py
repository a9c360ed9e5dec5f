"""The model's own input checks (``torch._assert``) with their messages completed when they fail.

Code that formats a traced size into its message (timm's ``f"Input height ({H}) doesn't match model"``) formats a
proxy at trace time, so the captured check would say ``Proxy(getitem_2)`` whatever the input; after capture each
such check names the size's node instead and puts its value in the message when it fails.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import has_side_effect

from ..ops.registry import graph_op

PROXY = re.compile(r"Proxy\((\w+)\)")  # a traced value formatted into a string


@graph_op()
def check_input(condition: Any, parts: tuple[str, ...], *values: Any) -> None:
    """``torch._assert(condition, message)`` for a message that is ``parts`` with ``values`` between them."""
    if not condition:
        raise AssertionError("".join(part + str(value) for part, value in zip(parts, (*values, ""))))


has_side_effect(check_input)  # kept by dead-code elimination, as torch._assert is


def complete_assert_messages(graph: fx.Graph, formatted: dict[str, fx.Node]) -> None:
    """Make each ``torch._assert`` of ``graph`` on a condition of shapes (not a tensor: torch.compile and export treat
    a check of data apart) whose message shows traced values a :func:`check_input` of them.

    ``formatted``: the text of each proxy of the trace that made ``graph`` formatted into a string, and its node. A
    message formatted by another trace (a ``GraphModule``'s code holds the text of its own trace's proxies) names
    nodes of that trace, and is left as it is.
    """
    for node in graph.find_nodes(op="call_function", target=torch._assert):
        condition, message = (*node.args, *node.kwargs.values(), None)[:2]
        shown = [match.group(0) for match in PROXY.finditer(message)] if isinstance(message, str) else []
        on_data = isinstance(condition, fx.Node) and isinstance(condition.meta.get("val"), torch.Tensor)
        if shown and not on_data and all(text in formatted for text in shown):
            node.target = check_input
            node.args = (condition, tuple(PROXY.split(message)[::2]), *(formatted[text] for text in shown))
            node.kwargs = {}
