"""Tensor functions that rewritten graphs call. Each is a small pure function on ``[B, N, C]`` tokens."""

from .clustering import cluster_keys_values, clustered_attention, padded_cluster_keys_values
from .merging import size_bias, tome_merge, tome_merged_tokens
from .sampling import ats_budget, ats_index, ats_pad, ats_picks, ats_select, ats_significance, gather_queries
from .scoring import class_attention, class_attention_from_probs
from .selection import evit_kept_tokens, evit_select, evit_select_sizes, gather_tokens, topk_rows

__all__ = [
    "class_attention", "class_attention_from_probs", "evit_kept_tokens", "evit_select", "evit_select_sizes",
    "topk_rows", "size_bias", "tome_merge", "tome_merged_tokens", "ats_budget", "ats_index", "ats_pad", "ats_picks",
    "ats_select", "ats_significance", "gather_queries", "gather_tokens", "clustered_attention", "cluster_keys_values",
    "padded_cluster_keys_values",
    "GRAPH_FUNCTIONS", "STREAM_FUNCTIONS", "SIZED_STREAM_FUNCTIONS",
]

# every function a pass inserts into a graph; re-tracing a saved graph keeps them as single calls
GRAPH_FUNCTIONS = (
    class_attention, class_attention_from_probs, evit_select, evit_select_sizes, topk_rows, tome_merge, size_bias,
    ats_select, ats_index, gather_queries, gather_tokens, ats_pad, clustered_attention, padded_cluster_keys_values,
)
# the ones that change the token stream ``f(tokens [B, N, C], *args) -> [B, N', C]`` (ToMe, ATS: the tokens
# are the first of the returned pair; ATS and Top-K inside attention gather the residual's rows, ATS then pads);
# each combines token rows with weights that do not depend on ``tokens``' values, so
# ``f(sources, *args)`` tracks token origins
STREAM_FUNCTIONS = (evit_select, tome_merge, ats_select, gather_tokens, ats_pad)
# the ones of those that take and return token sizes ``[B, N, 1]`` as their second argument and result
SIZED_STREAM_FUNCTIONS = (tome_merge, ats_select, ats_pad)
