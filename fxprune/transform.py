"""The one call: trace → analyse → plan → rewrite → verify."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from .analysis import analyse
from .capture import trace
from .passes import apply_passes
from .planning import Plan, macs_per_block, make_plan, measure_tokens
from .policies import Compose, Policy
from .verify import verify

__all__ = ["transform", "plan"]


def rewrite(
    model: nn.Module,
    policy: Policy | Compose,
    example_inputs: Sequence[torch.Tensor] | None,
    copy_weights: bool,
    second_batch: bool = True,
) -> tuple[fx.GraphModule, Plan]:
    """The rewritten module and its plan: what :func:`transform` returns (``second_batch=False``: checked at the
    captured batch size only, as :func:`plan` with ``fast``) and :func:`plan` reports."""
    program = analyse(trace(model, example_inputs, copy_weights=copy_weights))
    planned = make_plan(program, policy)
    dense_macs = macs_per_block(program.gm, program.blocks, program.batch)
    gm = apply_passes(program.gm, program, list(planned.rows))
    verify(gm, program, planned, second_batch)
    measured = planned.measured(
        measure_tokens(program, planned), dense_macs, macs_per_block(gm, program.blocks, program.batch)
    )
    _finalize(gm, measured)
    return gm, measured


def _finalize(gm: fx.GraphModule, the_plan: Plan) -> None:
    """Drop dead nodes (resolved guards) and the example values, which hold fake tensors."""
    gm.graph.eliminate_dead_code()
    gm.recompile()
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
        node.meta.pop("macs", None)
    gm.fxprune_plan = the_plan


def plan(
    model: nn.Module,
    policy: Policy | Compose,
    example_inputs: Sequence[torch.Tensor] | None = None,
    *,
    fast: bool = False,
) -> Plan:
    """What :func:`transform` would do to ``model``: one row per block (action, tokens in → out, MACs).

    Nothing of ``model`` changes; ``print(fxprune.plan(model, policy))`` shows the table. ``fast`` checks the
    rewrite at the captured batch size only, not at a second one (where batch sizes fixed as literals show):
    one fewer run of the graph on example values, for searching settings by their MACs; :func:`transform`
    always checks both.
    """
    return rewrite(model, policy, example_inputs, copy_weights=False, second_batch=not fast)[1]


def transform(
    model: nn.Module,
    policy: Policy | Compose,
    example_inputs: Sequence[torch.Tensor] | None = None,
    *,
    copy_weights: bool = False,
    verbose: bool = False,
) -> fx.GraphModule:
    """Rewrite ``model`` with ``policy`` and return a new ``torch.fx.GraphModule``.

    ``model`` is not modified: its modules are deep-copied before tracing. Parameters and buffers are
    shared with ``model`` (as with ``torch.fx.symbolic_trace``), so training the result trains ``model``
    too; ``copy_weights=True`` gives the result its own copy. ``example_inputs`` fixes the input size the plan
    is made for (default: the size the model declares, batch 2). The result carries the plan as
    ``.fxprune_plan``; ``verbose=True`` prints it. Raises :class:`~fxprune.PolicyError` for an invalid
    policy and :class:`~fxprune.UnsupportedModelError` when a rewrite would compute wrong numbers.
    """
    gm, the_plan = rewrite(model, policy, example_inputs, copy_weights)
    if verbose:
        print(the_plan)
    return gm
