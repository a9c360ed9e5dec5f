"""ATS: sample tokens by class attention × value norm between a block's attention and its MLP."""

from __future__ import annotations

import torch.fx as fx

from ..analysis import TokenProgram
from ..ops import ats_select
from ..plan import Plan
from ..policies import ATS
from .common import class_scores, reroute_sized_stream


def ats_pass(gm: fx.GraphModule, program: TokenProgram, plan: Plan, policy: ATS) -> fx.GraphModule:
    """At each block of ``policy``: score beside the kept SDPA call, sample after the residual add.

    The padding slots get size 0, which :func:`~fxprune.passes.tome.thread_sizes` turns into masked keys
    in every later attention.
    """
    for row in plan.rows_for(policy):
        block = program.blocks[row.index]
        args = (class_scores(gm, block), block.attention.v, policy.k_at(row.index), program.prefix_tokens)
        reroute_sized_stream(gm, block, ats_select, args, policy.method)
    return gm
