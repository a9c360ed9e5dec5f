"""ATS: sample tokens by class attention × value norm, inside the attention where it is fused.

At an SDPA site the sampling runs before the attention, from the same ``q``, ``k``, ``v``, and only the
sampled queries are attended with (:func:`~fxprune.passes.common.select_queries`) — the paper's
placement, and fewer MACs than attending with every query and dropping rows afterwards. At an explicit
``softmax(q @ kᵀ) @ v`` the rows are selected after the residual add instead (same outputs). Either way
the padding slots get size 0, which :func:`~fxprune.passes.tome.thread_sizes` turns into masked keys in
every later attention; it also hands the sizes to every later reduction (ATS included), so that each image
is reduced from its own tokens. Every block places as many points as the model has tokens at its input (a
shape read of the first block's input), as the official code does.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from ..analysis import Block, TokenProgram
from ..ops import ats_index, ats_pad, ats_select
from ..ops.sampling import Cap
from ..plan import Plan
from ..policies import ATS
from .common import class_scores, gathers_queries, insert_call, model_tokens, reroute_sized_stream, select_queries


def ats_pass(gm: fx.GraphModule, program: TokenProgram, plan: Plan, policy: ATS) -> fx.GraphModule:
    """At each block of ``policy``: sample inside the attention (SDPA) or after the residual add."""
    ref_tokens = model_tokens(gm, program)
    for row in plan.rows_for(policy):
        block = program.blocks[row.index]
        cap, prefix = policy.cap_at(row.index), program.prefix_tokens
        if gathers_queries(block):
            _sample_queries(gm, block, cap, prefix, ref_tokens)
        else:
            args = (class_scores(gm, block), block.attention.v, cap, prefix, ref_tokens)
            reroute_sized_stream(gm, block, ats_select, args, policy.method)
    return gm


def _sample_queries(gm: fx.GraphModule, block: Block, cap: Cap, prefix: int, ref_tokens: fx.Node) -> None:
    """Sample before ``block``'s SDPA call, attend with the sampled queries, then pad (size 0) the unused slots;
    the sizes entering the block (``size``, which marks padding) are wired by :func:`thread_sizes`."""
    scores = class_scores(gm, block, before=True)
    args = (scores, block.attention.v, cap, prefix, ref_tokens)
    pair = insert_call(gm, scores, ats_index, args, {"size": None}, block, "ats_index")
    index = insert_call(gm, pair, operator.getitem, (pair, 0), {}, block, "ats_rows")
    valid = insert_call(gm, index, operator.getitem, (pair, 1), {}, block, "ats_valid")
    select_queries(gm, block, index)
    reroute_sized_stream(gm, block, ats_pad, (index, valid), "ats")
