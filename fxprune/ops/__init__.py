"""Tensor functions that rewritten graphs call. Each is a small pure function on ``[B, N, C]`` tokens and
declares its graph role where it is defined (:mod:`fxprune.ops.registry`)."""

from .clustering import cluster_keys_values, clustered_attention, padded_cluster_keys_values
from .merging import size_bias, tome_merge, tome_merge_positions, tome_merged_tokens
from .pooling import size_weighted_mean
from .positions import at_positions
from .pruning import gumbel_keep, keep_rows, policy_attention, softmax_with_policy, with_prefix
from .registry import KEEP, POSITIONS, ROWS, SIZES, GraphOp, follows, graph_functions, graph_op, op_of
from .sampling import (
    ats_budget,
    ats_index,
    ats_pad,
    ats_pad_positions,
    ats_picks,
    ats_significance,
    gather_mask_rows,
    gather_queries,
)
from .scoring import (
    class_attention,
    class_attention_from_probs,
    received_attention,
    received_attention_from_probs,
)
from .selection import (
    evit_kept_tokens,
    evit_select,
    evit_select_positions,
    evit_select_sizes,
    gather_tokens,
    initial_state,
    topk_rows,
)

__all__ = [
    "class_attention", "class_attention_from_probs", "received_attention", "received_attention_from_probs",
    "evit_kept_tokens", "evit_select", "evit_select_sizes",
    "evit_select_positions", "topk_rows", "size_bias", "tome_merge", "tome_merge_positions", "tome_merged_tokens",
    "ats_budget", "ats_index", "ats_pad", "ats_pad_positions", "ats_picks", "ats_significance", "gather_queries",
    "gather_mask_rows",
    "gather_tokens", "initial_state", "clustered_attention", "cluster_keys_values", "padded_cluster_keys_values",
    "keep_rows", "gumbel_keep", "size_weighted_mean", "at_positions", "with_prefix", "softmax_with_policy",
    "policy_attention",
    "GraphOp", "graph_op", "follows", "op_of", "graph_functions", "SIZES", "POSITIONS", "KEEP", "ROWS",
]
