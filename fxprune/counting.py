"""MACs in the papers' convention (fvcore: one multiply-add = one op, reported as "GFLOPs").

Counted at the ATen level while the model runs, so every op is seen whatever module or fxprune op it
comes from: matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``, in place or not; biases not counted),
convolutions (output elements × input channels per group × kernel size), fused attention
(``B·H·Nq·Nk·(d + d_v)``, i.e. ``2·B·H·Nq·Nk·d`` for equal widths; ``FlopCounterMode`` counts 0 for the CPU
kernel; ``nn.MultiheadAttention``'s fused inference kernel is counted too) and layer/group norms (5 ops
per element with affine, 4 without, as fvcore). Element-wise ops, softmax and activations count 0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["flops", "count_macs", "MacCounter"]

aten = torch.ops.aten


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _mm(args: tuple, out: Any) -> int:
    a, b = args[-2], args[-1]
    return _numel(a.shape[:-1]) * a.shape[-1] * b.shape[-1]


def _bmm(args: tuple, out: Any) -> int:
    a, b = args[-2], args[-1]
    return _numel(a.shape) * b.shape[-1]


def _convolution(args: tuple, out: Any) -> int:
    x, w, transposed = args[0], args[1], args[6]
    if transposed:
        return _numel(x.shape) * w.shape[1] * _numel(w.shape[2:])
    return _numel(out.shape) * w.shape[1] * _numel(w.shape[2:])


def _attention(args: tuple, out: Any) -> int:
    q, k, v = args[:3]
    return _numel(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _layer_norm(args: tuple, out: Any) -> int:
    weight = args[2] if len(args) > 2 else None
    return _numel(args[0].shape) * (5 if weight is not None else 4)


def _group_norm(args: tuple, out: Any) -> int:
    weight = args[1] if len(args) > 1 else None
    return _numel(args[0].shape) * (5 if weight is not None else 4)


def _native_mha(args: tuple, out: Any) -> int:
    q, k, embed = args[0], args[1], args[3]
    tokens_q, tokens_k = _numel(q.shape[:-1]), _numel(k.shape[:-1])
    projections = (tokens_q + 2 * tokens_k + tokens_q) * embed * embed
    return projections + 2 * tokens_q * k.shape[-2] * embed


_COUNTERS = {
    aten._native_multi_head_attention.default: _native_mha,
    **{op: _mm for op in (aten.mm.default, aten.mm.out, aten.addmm.default, aten.addmm_.default, aten.addmm.out)},
    **{op: _bmm for op in (aten.bmm.default, aten.bmm.out, aten.baddbmm.default, aten.baddbmm_.default,
                           aten.baddbmm.out)},
    aten.convolution.default: _convolution,
    aten.native_layer_norm.default: _layer_norm,
    aten.native_group_norm.default: _group_norm,
}
for _name in (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
):
    if hasattr(aten, _name):
        _COUNTERS[getattr(aten, _name).default] = _attention


@functools.cache
def _composite(func: Any) -> bool:
    """Whether ``func`` is an ATen op made of other ops (``linear``, ``layer_norm``): such an op reaches a dispatch
    mode whole only where autograd is off for its inputs (inference mode, inference tensors)."""
    return (
        isinstance(func, torch._ops.OpOverload)
        and func is not torch.ops.prim.device.default
        and torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), torch._C.DispatchKey.CompositeImplicitAutograd)
    )


class MacCounter(TorchDispatchMode):
    """Dispatch mode that adds up the MACs of the ATen ops run under it in ``self.total`` (composite ops as the ops
    they are made of, as in autograd mode, also within ``torch.inference_mode()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = _COUNTERS.get(func)
        if counter is None and _composite(func):  # counted as the ops it is made of
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if counter is not None:
            self.total += counter(args, out)
        return out


def count_macs(model: nn.Module, inputs: Sequence[torch.Tensor] | Mapping[str, Any]) -> int:
    """Total MACs of one forward of ``model`` on ``inputs`` (its positional arguments, or its arguments by name;
    real execution, no autograd)."""
    counter = MacCounter()
    with torch.no_grad(), counter:
        model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)
    return counter.total


def flops(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor | Mapping[str, Any]) -> int:
    """MACs per image, in the papers' convention, averaged over the batch ``example_inputs`` (a tensor, the
    model's positional arguments, or its arguments by name; the first tensor's first axis is the batch).

    Works on any module: the original model or one returned by :func:`fxprune.transform`. For methods
    whose token counts depend on the image, pass real images; the mean over them is returned.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    values = example_inputs.values() if isinstance(example_inputs, Mapping) else example_inputs
    batch = next(value for value in values if isinstance(value, torch.Tensor)).shape[0]
    return round(count_macs(model, example_inputs) / batch)
