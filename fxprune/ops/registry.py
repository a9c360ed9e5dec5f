"""Graph roles of the tensor functions: how each one behaves as a node of a rewritten graph.

A function that a pass inserts into a graph is declared where it is defined, with :func:`graph_op`. The
declaration says what later stages need to know without looking at the function:

* ``stream``: it changes the token stream, ``f(tokens [B, N, C], *args) -> [B, N', C]`` (``sized``: it also
  takes the sizes ``[B, N, 1]`` as its second argument and returns ``(tokens, sizes)``). Each new row combines
  input rows with weights that do not depend on the tokens' values, so ``f(sources, *args)`` tracks origins
  (what ``fxprune.show`` draws).
* ``carries``: the token-state channels (``"sizes"``, ``"positions"``, per-row ``[B, N, 1]`` tensors) that follow
  it by applying the function itself to the state: ``f(state, *args)`` (a row gather). Other channels follow by a
  function declared with :func:`follows`, called as ``g(state, *args[1:], **kwargs)`` with the stream call's
  arguments. A sized op carries ``"sizes"`` itself. ``"rows"`` (for restoring a dense output's token layout) is
  where it sends each input row, ``[B, N_in]`` (the output row that holds it, −1: none), from a rule
  ``g(tokens, *args[1:], **kwargs)``; with no rule declared, the output row with the largest weight in the function's
  result on the identity over its input rows (EViT's rule leaves out its fused token: it summarises the dropped
  rows, it does not hold them).
* ``reads_mask``: it reads the attention's per-key bias as its ``attn_mask`` keyword (scores, clustering),
  so a bias added to that attention later must reach it too.
* ``padding``: the keyword that, in a padded batch (padding has size 0 and comes after each image's own rows),
  tells it each image's own tokens: a sized op receives True (it has the sizes already), any other the sizes.
* ``worst_case``: the op's result shapes depend on the values of its inputs (eager graphs only); this function,
  called with the same arguments, gives a result of the largest shapes it can have. Example values (fake
  tensors, which carry no data) are propagated through it.

Every declared function is kept as one call when a saved graph is traced again (:func:`graph_functions`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = ["GraphOp", "graph_op", "follows", "op_of", "graph_functions", "data_dependent", "SIZES", "POSITIONS", "KEEP",
           "ROWS"]

SIZES = "sizes"  # patches each row stands for; 0 marks padding
POSITIONS = "positions"  # the index of each row in the first block's input; -1 for a row made of several
KEEP = "keep"  # a training graph's keep policy: 1 kept, 0 dropped but not removed (attention ignores it as a key)
ROWS = "rows"  # where a stream function sends each input row: the output row holding it, -1 for none

F = TypeVar("F", bound=Callable)


@dataclasses.dataclass
class GraphOp:
    """What a graph function declares about itself (see the module docstring)."""

    fn: Callable
    stream: bool = False
    sized: bool = False
    reads_mask: bool = False
    padding: str | None = None
    worst_case: Callable | None = None
    follow: dict[str, Callable] = dataclasses.field(default_factory=dict)

    def follows_with(self, channel: str) -> Callable | None:
        """The function that gives ``channel`` of this op's output rows from the channel of its input rows."""
        return self.follow.get(channel)


_OPS: dict[Callable, GraphOp] = {}


def graph_op(
    *,
    stream: bool = False,
    sized: bool = False,
    carries: tuple[str, ...] = (),
    reads_mask: bool = False,
    padding: str | None = None,
    worst_case: Callable | None = None,
) -> Callable[[F], F]:
    """Declare the decorated function a graph function with these roles; it is returned unchanged."""

    def declare(fn: F) -> F:
        op = _OPS.setdefault(fn, GraphOp(fn))
        op.stream, op.sized, op.reads_mask, op.padding = stream, sized, reads_mask, padding
        op.worst_case = worst_case
        op.follow.update({channel: fn for channel in carries})
        return fn

    return declare


def follows(op: Callable, *channels: str) -> Callable[[F], F]:
    """Declare the decorated function the rule by which ``channels`` follow the stream function ``op``."""

    def declare(fn: F) -> F:
        graph_op()(fn)
        _OPS.setdefault(op, GraphOp(op)).follow.update({channel: fn for channel in channels})
        return fn

    return declare


def op_of(fn: object) -> GraphOp | None:
    """The declaration of graph function ``fn``, or None when it is not one."""
    try:
        return _OPS.get(fn)  # type: ignore[arg-type]
    except TypeError:  # an unhashable node target
        return None


def data_dependent(nodes: Iterable[Any]) -> list[str]:
    """The names of the graph functions that ``nodes`` (a graph's ``torch.fx`` nodes) call whose result shapes
    depend on the data (those declaring a ``worst_case``), sorted, each once: empty for a graph of static shapes."""
    return sorted({node.target.__name__ for node in nodes if node.op == "call_function"
                   and getattr(op_of(node.target), "worst_case", None) is not None})


def graph_functions() -> tuple[Callable, ...]:
    """Every declared graph function (``fxprune.ops`` declares its own on import)."""
    return tuple(_OPS)
