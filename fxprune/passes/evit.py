"""EViT and Top-K: select tokens by class attention between a block's attention and its MLP.

EViT needs every row after the residual add (its fused token sums the dropped ones), so it selects there,
scoring beside the kept SDPA call. Top-K drops the other rows outright: at an SDPA site it scores before the
attention and only the kept queries attend (:func:`~fxprune.passes.common.select_queries`), which gives the
same outputs for fewer MACs; at an explicit ``softmax(q @ kᵀ) @ v`` it selects after the add, like EViT.
"""

from __future__ import annotations

import torch.fx as fx

from ..analysis import TokenProgram
from ..ops import evit_select, topk_rows
from ..plan import Plan
from ..policies import EViT
from .common import class_scores, gathers_queries, insert_call, reroute_stream, select_queries


def evit_pass(gm: fx.GraphModule, program: TokenProgram, plan: Plan, policy: EViT) -> fx.GraphModule:
    """At each block of ``policy``: select the top tokens by class attention (see the module docstring)."""
    for row in plan.rows_for(policy):
        block = program.blocks[row.index]
        if not policy.fuse and gathers_queries(block):
            scores = class_scores(gm, block, before=True)
            args = (scores, policy.keep_rate, program.prefix_tokens)
            select_queries(gm, block, insert_call(gm, scores, topk_rows, args, {}, block, "topk_rows"))
        else:
            scores = class_scores(gm, block)
            args = (scores, policy.keep_rate, program.prefix_tokens, policy.fuse)
            reroute_stream(gm, block, evit_select, args, policy.method)
    return gm
