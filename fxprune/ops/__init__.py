"""Tensor functions that rewritten graphs call. Each is a small pure function on ``[B, N, C]`` tokens."""

from .scoring import class_attention, class_attention_from_probs
from .selection import evit_kept_tokens, evit_select

__all__ = ["class_attention", "class_attention_from_probs", "evit_kept_tokens", "evit_select", "GRAPH_FUNCTIONS"]

# every function a pass inserts into a graph; re-tracing a saved graph keeps them as single calls
GRAPH_FUNCTIONS = (class_attention, class_attention_from_probs, evit_select)
