"""Report on a transformed model: its plan (tokens and MACs per block) and the nodes fxprune inserted."""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from .capture import TraceInfo
from .errors import FxPruneError
from .planning import Plan

__all__ = ["Report", "report"]


def _format_arg(arg: object) -> str:
    if isinstance(arg, fx.Node):
        return arg.name
    if isinstance(arg, (tuple, list)):
        return "(" + ", ".join(_format_arg(a) for a in arg) + ")"
    return repr(arg)


def _format_call(node: fx.Node) -> str:
    target = node.target
    name = f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', target)}".lstrip(".")
    args = [_format_arg(a) for a in node.args] + [f"{k}={_format_arg(v)}" for k, v in node.kwargs.items()]
    return f"{node.name} = {name}({', '.join(args)})"


@dataclasses.dataclass
class Report:
    """Printable summary of a model returned by :func:`fxprune.transform`."""

    plan: Plan
    trace: TraceInfo
    inserted: list[str]

    def __str__(self) -> str:
        lines = [str(self.plan), "", str(self.trace), "", f"inserted nodes ({len(self.inserted)}):"]
        lines.extend(f"  {line}" for line in self.inserted)
        return "\n".join(lines)


def report(gm: fx.GraphModule) -> Report:
    """The plan, capture notes and inserted nodes of a model returned by :func:`fxprune.transform`."""
    plan = getattr(gm, "fxprune_plan", None)
    if plan is None:
        raise FxPruneError("fxprune.report expects a model returned by fxprune.transform")
    inserted = [_format_call(n) for n in gm.graph.nodes if "fxprune" in n.meta]
    return Report(plan, gm.meta["fxprune_trace"], inserted)
