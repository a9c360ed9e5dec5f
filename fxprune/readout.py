"""Readout: which rows of the final token stream reach a captured model's output, read from the graph itself.

A row reaches an output element when a NaN written into that row alone of the final ``[B, N, C]`` tokens makes the
element NaN: only the graph after the final tokens runs, on random values, so this costs a few runs of the model's
head. From that, a prefix row is a *class row* when it reaches output elements that no patch row reaches (a
classifier on ``x[:, 0]``, a distillation head on ``x[:, 1]``, the first rows of a dense output); patch rows are
*dense* when each reaches elements of its own (a backbone that returns every token, also beside a pooled output, as
Hugging Face's ``last_hidden_state`` beside ``pooler_output``); when two of them reach the same element, *pooled* if
the output does not depend on the patch rows' order (a mean or attention pool) and *ordered* if it does (convolutions
over the patch grid: a dense-prediction neck).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

__all__ = ["Readout", "data_nodes", "is_shape_read", "readout"]


@dataclasses.dataclass(frozen=True)
class Readout:
    """How a model's output reads the rows of its final ``[B, N, C]`` tokens (P prefix rows first).

    ``class_rows``: the prefix rows that reach output elements no patch row reaches; ``patches``: ``'none'`` (no
    patch row reaches the output), ``'dense'`` (each patch row reaches output elements of its own), ``'pooled'``
    (patch rows meet in the same output elements, whatever their order) or ``'ordered'`` (they meet, and their order
    changes the output: convolutions over their grid); ``why``: set when the rows could not be tested."""

    class_rows: tuple[int, ...] = ()
    patches: str = "none"
    why: str | None = None

    def __str__(self) -> str:
        if self.why is not None:
            return f"not read ({self.why})"
        rows = {"none": "no patch row", "pooled": "a pool over the patch rows", "dense": "every patch row",
                "ordered": "every patch row in its place (convolutions over their grid)"}
        alone = (f"prefix row(s) {', '.join(map(str, self.class_rows))} alone, "
                 if self.class_rows else "no prefix row alone, ")
        return f"the output reads {alone}{rows[self.patches]}"


_METADATA = ("shape", "dtype", "device", "ndim", "is_cuda")
_METADATA_METHODS = ("size", "dim", "numel", "get_device", "is_floating_point")


def is_shape_read(node: fx.Node) -> bool:
    """Whether ``node`` reads a tensor's shape or other metadata (``x.shape``, ``x.size()``, ``x.dim()``,
    ``x.dtype``, ``x.device``), not its values."""
    return (node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA) or (
        node.op == "call_method" and node.target in _METADATA_METHODS
    )


def data_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes whose values depend on the input's values (not only on its shape)."""
    found: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or (not is_shape_read(node) and any(n in found for n in node.all_input_nodes)):
            found.add(node)
    return found


def _example(value: Any, generator: torch.Generator) -> Any:
    """A real tensor with ``value``'s shape and dtype (random floats), or ``value`` itself when it is no tensor."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.dtype.is_floating_point:
        return torch.randn(value.shape, generator=generator, dtype=value.dtype)
    return torch.zeros(value.shape, dtype=value.dtype)


class _Tail(fx.Interpreter):
    """Runs the part of ``gm`` that reads ``tokens``: ``tokens`` takes a given value, the input-dependent values
    (``data``, from :func:`data_nodes`) computed before it take random ones, everything else runs as it is."""

    def __init__(self, gm: fx.GraphModule, tokens: fx.Node, data: set[fx.Node]):
        super().__init__(gm, garbage_collect_values=True)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.leaves = {n for n in data if order[n] < order[tokens]} | {tokens}
        self.needed: set[fx.Node] = set()
        todo = list(gm.graph.find_nodes(op="output"))
        while todo:
            node = todo.pop()
            if node not in self.needed:
                self.needed.add(node)
                if node not in self.leaves:
                    todo.extend(node.all_input_nodes)
        self.tokens, self.values = tokens, {}
        generator = torch.Generator().manual_seed(0)
        for leaf in sorted(self.leaves & self.needed, key=order.get):
            self.values[leaf] = _example(leaf.meta.get("val"), generator)

    def run_node(self, node: fx.Node) -> Any:
        if node not in self.needed:
            return None
        if node in self.values:
            return self.values[node]
        return super().run_node(node)

    def outputs(self, change: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The output's tensors, flattened and joined, with the token rows taken through ``change`` first."""
        clean = self.values[self.tokens]
        self.values[self.tokens] = clean if change is None else change(clean)
        try:
            with torch.no_grad():
                out = self.run(*[None] * len(self.graph.find_nodes(op="placeholder")))
        finally:
            self.values[self.tokens] = clean
        leaves = [leaf.flatten() for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor)]
        return torch.cat(leaves) if leaves else torch.zeros(0)

    def nan_mask(self, rows: torch.Tensor | None) -> torch.Tensor:
        """Which output elements are NaN when the token rows ``rows`` (a bool ``[N]``; None: none) are NaN."""
        if rows is None:
            return self.outputs().isnan()
        return self.outputs(lambda x: x.masked_fill(rows[None, :, None], float("nan"))).isnan()

    def reads_order(self, prefix: int) -> bool:
        """Whether the output changes when the patch rows (after ``prefix`` rows) come in reverse order."""
        clean, flipped = self.outputs(), self.outputs(lambda x: torch.cat([x[:, :prefix], x[:, prefix:].flip(1)], 1))
        if not clean.is_floating_point():
            return not torch.equal(clean, flipped)
        return bool(((clean - flipped).abs() > 1e-4 * clean.abs().amax().clamp(min=1e-6)).any())


def readout(gm: fx.GraphModule, tokens: fx.Node | None, prefix: int, data: set[fx.Node]) -> Readout:
    """Which rows of ``tokens`` (the final ``[B, N, C]`` value of the stream, ``prefix`` prefix rows first) reach
    the output of ``gm`` (captured, with example values; ``data``: its :func:`data_nodes`): see :class:`Readout`."""
    value = tokens.meta.get("val") if tokens is not None else None
    if not isinstance(value, torch.Tensor) or value.dim() != 3 or value.shape[1] <= prefix:
        return Readout(why="no [B, N, C] token sequence after the last block")
    tail, count = _Tail(gm, tokens, data), value.shape[1]
    try:
        clean = tail.nan_mask(None)
        masks = [tail.nan_mask(torch.arange(count) == row) & ~clean for row in range(prefix)]
        first, last = (tail.nan_mask(torch.arange(count) == row) & ~clean for row in (prefix, count - 1))
    except Exception as error:  # the head fails on random values: say so, assume nothing
        return Readout(why=f"the graph after the final tokens did not run on random values: {error}")
    patches = first | last
    class_rows = tuple(row for row, mask in enumerate(masks) if mask.any() and not (mask & patches).any())
    if not patches.any():
        kind = "none"
    elif count - prefix > 1 and (first & ~last).any() and (last & ~first).any():
        kind = "dense"
    else:
        kind = "ordered" if tail.reads_order(prefix) else "pooled"
    return Readout(class_rows, kind)
