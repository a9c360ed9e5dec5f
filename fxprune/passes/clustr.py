"""ClusTR: replace a block's attention over ``N`` keys by attention over ``P + M`` clustered keys and values.

At an SDPA site the call becomes :func:`~fxprune.ops.clustered_attention` with the same inputs (one fused
SDPA per head group over the cluster tokens). At an explicit ``softmax(q @ kᵀ …) @ v`` the cluster keys
replace ``kᵀ`` in the first product, their ``log(size)`` bias is added to the softmax input and the
cluster values replace ``v`` in the second product, so any scaling between product and softmax is
kept. Queries, and so the token stream, are unchanged.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from ..analysis import Block, TokenProgram, logits_path, sdpa_arguments
from ..errors import UnsupportedModelError
from ..ops import clustered_attention, padded_cluster_keys_values
from ..plan import Plan
from ..policies import ClusTR
from .common import insert_call


def clustr_pass(gm: fx.GraphModule, program: TokenProgram, plan: Plan, policy: ClusTR) -> fx.GraphModule:
    """At each block of ``policy``: attend to clustered keys and values instead of every token."""
    for row in plan.rows_for(policy):
        block = program.blocks[row.index]
        cluster = (policy.scales, program.prefix_tokens, policy.clustering, policy.iterations)
        if block.attention.kind == "sdpa":
            _replace_sdpa(gm, block, cluster)
        else:
            _cluster_explicit(gm, block, cluster)
    return gm


def _replace_sdpa(gm: fx.GraphModule, block: Block, cluster: tuple) -> None:
    site = block.attention
    args = sdpa_arguments(site.node)
    kwargs = {name: args[name] for name in ("attn_mask", "dropout_p", "scale")}
    node = insert_call(gm, site.node, clustered_attention, (site.q, site.k, site.v, *cluster), kwargs, block, "clustr")
    site.node.replace_all_uses_with(node)
    gm.graph.erase_node(site.node)


def _cluster_explicit(gm: fx.GraphModule, block: Block, cluster: tuple) -> None:
    site = block.attention
    path = logits_path(site)
    product, logits = path[0], path[-1]
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    if order[site.v] > order[product]:
        raise UnsupportedModelError(
            f"ClusTR cannot rewrite block {block.index} ({block.name}): its values {site.v.name} are computed "
            f"after its attention logits {product.name}. Choose other layers."
        )
    args = (site.k, site.v, *cluster)
    pair = insert_call(gm, product.prev, padded_cluster_keys_values, args, {"attn_mask": None}, block, "clustr")
    bias, values, keys = (
        insert_call(gm, pair, operator.getitem, (pair, i), {}, block, f"clustr_{name}")
        for i, name in ((2, "bias"), (1, "values"), (0, "keys"))
    )
    with gm.graph.inserting_after(keys):
        transposed = gm.graph.call_method("transpose", (keys, -2, -1))
    product.replace_input_with(product.args[1], transposed)
    biased = insert_call(gm, logits, operator.add, (logits, bias), {}, block, "clustr_logits")
    site.node.replace_input_with(logits, biased)
    site.output.replace_input_with(site.v, values)
