"""ClusTR: replace a block's attention over ``N`` keys by attention over ``P + M`` clustered keys and values.

At an SDPA site the call becomes :func:`~fxprune.ops.clustered_attention` with the same inputs (one fused
SDPA per head group over the cluster tokens; a relative position bias in its mask becomes each query's bias
to each cluster, :func:`~fxprune.ops.clustering.cluster_logit_bias`). At an explicit
``softmax(q @ kᵀ …) @ v`` the cluster keys replace ``kᵀ`` in the first product, their ``log(size)`` bias is
added to the softmax input and the cluster values replace ``v`` in the second product, so any scaling
between product and softmax is kept. Queries, and so the token stream, are unchanged."""

from __future__ import annotations

import dataclasses
import operator
from typing import ClassVar

import torch.fx as fx

from ..analysis import Block, TokenProgram, logits_path, regrouped_keys_refusal, sdpa_arguments
from ..errors import PolicyError, UnsupportedModelError
from ..ops import clustered_attention, padded_cluster_keys_values
from ..ops.clustering import SEEDINGS
from ..passes.common import Rewrite, Role, graph_order, insert_call
from ..policies import (
    Policy,
    check_layers,
    int_per_layer,
    option,
    parse_count,
    parse_counts,
    parse_layers,
    parse_word,
    per_layer_text,
)
from .registry import SweepContext, register_method

__all__ = ["ClusTR"]


@dataclasses.dataclass(frozen=True)
class ClusTR(Policy):
    """ClusTR (Xie et al., 2022): every query attends to ``num_clusters`` clusters of keys and values.

    In each chosen block the non-prefix keys are clustered per image on the head-averaged keys, with
    ``clustering`` ``"dpc"`` (DPC-KNN, the official code's one-pass density peaks clustering) or
    ``"kmeans"`` (farthest-point seeds), then ``iterations`` weighted Lloyd steps (None: 0 for ``"dpc"``,
    3 for ``"kmeans"``); each cluster's key and value are its members' means and ``log(cluster size)``
    is added to its logit. Prefix tokens stay their own clusters; the token count is unchanged. A
    tuple of cluster counts is the multi-scale variant: the heads are split into that many equal
    groups, group ``g`` attending to ``num_clusters[g]`` clusters. ``layers=None`` means every block.
    """

    num_clusters: int | tuple[int, ...] = option(parse_counts, "m")
    layers: tuple[int, ...] | None = option(parse_layers, default=None)
    iterations: int | None = option(parse_count, default=None)
    clustering: str = option(parse_word, default="dpc")
    default_iterations: ClassVar[dict[str, int]] = {"dpc": 0, "kmeans": 3}

    def __post_init__(self) -> None:
        meaning = "a positive int (clusters per image; a tuple: one count per head group)"
        object.__setattr__(self, "num_clusters", int_per_layer(self.num_clusters, "ClusTR.num_clusters", 1, meaning))
        if self.layers is not None:
            object.__setattr__(self, "layers", check_layers(self.layers, "ClusTR"))
        if self.clustering not in SEEDINGS:
            raise PolicyError(f"ClusTR.clustering must be one of {', '.join(map(repr, SEEDINGS))}, "
                              f"got {self.clustering!r}")
        if self.iterations is None:
            object.__setattr__(self, "iterations", self.default_iterations[self.clustering])
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise PolicyError(f"ClusTR.iterations must be a non-negative int (Lloyd steps after the clustering) "
                              f"or None, got {self.iterations!r}")

    @property
    def scales(self) -> tuple[int, ...]:
        """Cluster count of each head group (one group unless multi-scale)."""
        return self.num_clusters if isinstance(self.num_clusters, tuple) else (self.num_clusters,)

    def bind(self, depth: int, patches: int | None = None) -> ClusTR:
        return self if self.layers is not None else dataclasses.replace(self, layers=tuple(range(depth)))

    def tokens_out(self, tokens_in: int, prefix: int, layer: int) -> int:
        return tokens_in

    def describe(self) -> str:
        scales = f"{per_layer_text(self.num_clusters)} clusters" + (" per head group" if len(self.scales) > 1 else "")
        clustering = {"dpc": "DPC-KNN", "kmeans": "farthest-point k-means"}[self.clustering]
        steps = f", {self.iterations} Lloyd iterations" if self.iterations else ""
        return f"{self.method} {scales} ({clustering}{steps})"

    def curve(self) -> str:
        return self.method + (" multi-scale" if len(self.scales) > 1 else "")


def _refusal(policy: ClusTR, block: Block) -> str | None:
    """ClusTR needs keys that can be regrouped (:func:`~fxprune.analysis.regrouped_keys_refusal`) and heads that
    split into its groups."""
    site, groups = block.attention, len(policy.scales)
    if site.num_heads % groups:
        return f"its {site.num_heads} heads cannot be split into {groups} equal groups, one per cluster count"
    return regrouped_keys_refusal(site)


def clustr_settings(ctx: SweepContext) -> list[ClusTR]:
    """ClusTR in every block with ``M`` = ½, ¼ and ⅛ of the patch tokens, and the multi-scale pair
    (⅛, ½) across two head groups where the heads split in two. Its MACs cannot fall to a fixed
    fraction (the MLPs and projections are untouched), so it is benchmarked at cluster counts."""
    patches = ctx.tokens - ctx.prefix_tokens
    settings = [ClusTR(max(1, patches // d)) for d in (2, 4, 8)]
    if ctx.num_heads % 2 == 0:
        settings.append(ClusTR((max(1, patches // 8), max(1, patches // 2))))
    return settings


@register_method(
    "clustr", ClusTR, needs_keys=True, reduces_tokens=False, keeps_attention=False, refuse=_refusal,
    settings=clustr_settings,
    identity=lambda layers: ClusTR(10**6, layers), example=lambda layers: ClusTR(4, layers),
)
def cluster_attention(gm: fx.GraphModule, program: TokenProgram, block: Block, policy: ClusTR) -> Rewrite:
    """Make ``block`` attend to clustered keys and values instead of every token."""
    cluster = (policy.scales, program.prefix_tokens, policy.clustering, policy.iterations)
    if block.attention.kind == "sdpa":
        _replace_sdpa(gm, block, cluster)
    else:
        _cluster_explicit(gm, block, cluster)
    return Rewrite()


def _replace_sdpa(gm: fx.GraphModule, block: Block, cluster: tuple) -> None:
    site = block.attention
    args = sdpa_arguments(site.node)
    kwargs = {name: args[name] for name in ("attn_mask", "dropout_p", "scale")}
    node = insert_call(
        gm, site.node, clustered_attention, (site.q, site.k, site.v, *cluster), kwargs, block, "clustr", Role.ATTENTION
    )
    site.node.replace_all_uses_with(node)
    gm.graph.erase_node(site.node)


def _cluster_explicit(gm: fx.GraphModule, block: Block, cluster: tuple) -> None:
    site = block.attention
    path = logits_path(site)
    product, logits = path[0], path[-1]
    order = graph_order(gm)
    if order(site.v) > order(product):
        raise UnsupportedModelError(
            f"ClusTR cannot rewrite block {block.index} ({block.name}): its values {site.v.name} are computed "
            f"after its attention logits {product.name}. Choose other layers."
        )
    args = (site.k, site.v, *cluster)
    pair = insert_call(
        gm, product.prev, padded_cluster_keys_values, args, {"attn_mask": None}, block, "clustr", Role.ATTENTION
    )
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
