"""EViT and Top-K: select tokens by class attention between a block's attention and its MLP."""

from __future__ import annotations

import torch.fx as fx

from ..analysis import TokenProgram
from ..ops import evit_select
from ..plan import Plan
from ..policies import EViT
from .common import class_scores, reroute_stream


def evit_pass(gm: fx.GraphModule, program: TokenProgram, plan: Plan, policy: EViT) -> fx.GraphModule:
    """At each block of ``policy``: score tokens beside the kept SDPA call, select after the residual add."""
    for row in plan.rows_for(policy):
        block = program.blocks[row.index]
        scores = class_scores(gm, block)
        args = (scores, policy.keep_rate, program.prefix_tokens, policy.fuse)
        reroute_stream(gm, block, evit_select, args, policy.method)
    return gm
