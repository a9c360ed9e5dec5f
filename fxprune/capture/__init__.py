"""Capture: trace an ``nn.Module`` into a ``torch.fx.GraphModule`` whose nodes carry example values.

The tracer is ``torch.fx`` symbolic tracing (shape reads such as ``B, N, C = x.shape`` stay runtime
reads, so every layer after a token-selection node adapts to fewer tokens) with three additions:

* every node gets ``node.meta['val']``: its value on the example inputs, computed with fake tensors
  (no real compute, static shapes);
* Python control flow on shapes, dtypes or other non-data values (``if x.dtype != w.dtype``,
  ``q.shape[2] > 1 and ...``) is resolved with those values instead of failing; each resolution is
  recorded as a *guard* and re-checked after every rewrite (a rewrite that would flip one is refused);
* a module whose code still cannot be traced (data-dependent control flow, untraceable dispatch) is
  made a leaf and the trace retried; the reason is recorded.

``nn.MultiheadAttention`` leaves are then decomposed into ``linear -> SDPA -> linear`` nodes, and two-operand
``einsum`` matrix products written as ``@``, so that the attention passes see them like any other attention.

Modules: :mod:`.tracer` builds the ``GraphModule`` (:func:`trace`; :func:`reusing_captures` for work that
rewrites one model many times), :mod:`.values` propagates example values on fake tensors (:func:`propagate`),
:mod:`.mha` decomposes ``nn.MultiheadAttention``, :mod:`.einsum` writes ``einsum`` products as ``@``,
:mod:`.asserts` completes the messages of the model's own input checks at run time, :mod:`.codegen` writes the
code a transformed model runs (its modules and parameters read directly), :mod:`.arguments` lets its call take the
model's other arguments at the values it was captured with.
"""

from .mha import decompose_multihead_attention as decompose_multihead_attention
from .tracer import ExampleInputs as ExampleInputs
from .tracer import Guard, TraceInfo, default_example_inputs, reusing_captures, trace
from .tracer import ReloadTracer as ReloadTracer  # graphs saved before the split name fxprune.capture.ReloadTracer
from .values import ValuePropagationError, propagate
from .values import example_inputs_like as example_inputs_like
from .values import fake_mode as fake_mode
from .values import fake_weights as fake_weights

__all__ = [
    "trace", "reusing_captures", "TraceInfo", "Guard", "default_example_inputs", "propagate", "ValuePropagationError",
]
