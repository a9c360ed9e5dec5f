"""Learned usage gates (AdaViT): per-image decisions to use a block's heads, sub-layers and patch tokens, and the
masks that apply them.

The rules are the official code's (``MengLcool/AdaViT``, ``models/ada_transformer_block.py``): a decision is a
hard Gumbel-sigmoid sample in training (τ = 5, straight-through) and ``sigmoid(logit) > threshold`` at evaluation;
a head not used has its q, k, v and output channels zeroed; a token not used is no key for the others, attends
only to itself, and gets no update from the block.

The skipping graph's ops whose results depend on the data (layouts, the heads some image uses, the row sums, the
head-sliced products, whose slices are read from the data) run in eager mode: under ``torch.compile`` the whole
skipping graph does (:class:`~fxprune.passes.learned.TrainEvalGraphModule`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import FxPruneError
from .registry import graph_op
from .scoring import with_attn_mask


@graph_op()
def gumbel_gate(logits: Tensor, threshold: float, tau: float = 5.0) -> Tensor:
    """Training decisions, the shape of ``logits``: ``1[sigmoid((logits + g₁ − g₂) / τ) > threshold]`` with
    ``g₁, g₂`` Gumbel noise, straight-through (the gradient of ``sigmoid((logits + g₁ − g₂) / τ)``)."""
    noise = -torch.empty_like(logits).exponential_().log() + torch.empty_like(logits).exponential_().log()
    soft = torch.sigmoid((logits + noise) / tau)
    hard = (soft > threshold).to(soft.dtype)
    return hard - soft.detach() + soft


@graph_op()
def threshold_gate(logits: Tensor, threshold: float) -> Tensor:
    """Evaluation decisions, the shape of ``logits``: ``1[sigmoid(logits) > threshold]`` (no noise, no τ), in the
    dtype of ``logits``."""
    return threshold_mask(logits, threshold).to(logits.dtype)


@graph_op()
def threshold_mask(logits: Tensor, threshold: float) -> Tensor:
    """Evaluation decisions as booleans, the shape of ``logits``: ``sigmoid(logits) > threshold``, compared as
    ``logits > log(threshold / (1 − threshold))``, which is the same test without the sigmoid. For a graph that only
    selects with its decisions (no conversion to the model's dtype)."""
    return logits > math.log(threshold / (1.0 - threshold))


@graph_op()
def every_one(x: Tensor, count: int) -> Tensor:
    """Decisions that use everything, for a kind not decided: ones ``[B, count]`` from ``x`` ``[B, C]``, or
    ``[B, N, count]`` from ``x`` ``[B, N, C]``, in ``x``'s dtype."""
    return x.new_ones(*x.shape[:-1], count)


@graph_op()
def head_gate(heads: Tensor | None) -> Tensor | None:
    """Per-head decisions ``[B, H]`` as a factor on ``[B, H, N, d]`` head tensors: ``[B, H, 1, 1]`` (None: none)."""
    return None if heads is None else heads[:, :, None, None]


@graph_op()
def channel_gate(heads: Tensor | None, head_dim: int) -> Tensor | None:
    """Per-head decisions ``[B, H]`` as a factor on ``[B, N, H·d]`` channels (head ``h`` owns channels
    ``h·d … (h+1)·d − 1``): ``[B, 1, H·d]`` (None: none)."""
    return None if heads is None else heads.repeat_interleave(head_dim, dim=1)[:, None, :]


def _always_varies(heads: Tensor, used: Tensor) -> Tensor:
    return heads


@graph_op(worst_case=_always_varies)
def varying_heads(heads: Tensor, used: Tensor) -> Tensor | None:
    """Each image's decisions ``[B, h]`` on the heads ``used`` ``[h]`` that some image uses (``heads`` ``[B, H]``),
    or None when every image uses all of them (always at batch 1, read without data): then they need no factor."""
    if heads.shape[0] == 1:
        return None
    chosen = heads.index_select(1, used)
    return None if bool(chosen.all()) else chosen


@graph_op()
def apply_factor(x: Tensor, factor: Tensor | None) -> Tensor:
    """``x · factor`` (``factor`` None: ``x``)."""
    return x if factor is None else x * factor


@graph_op()
def token_gate(tokens: Tensor, num_prefix: int) -> Tensor:
    """Per-row decisions ``[B, N, 1]`` from the patch tokens' ``tokens`` ``[B, N − P, 1]``: prefix rows always 1."""
    return torch.cat([tokens.new_ones(tokens.shape[0], num_prefix, 1), tokens], dim=1)


@graph_op()
def usage_mask(rows: Tensor) -> Tensor:
    """The attention mask of per-row decisions ``rows`` ``[B, N, 1]``: ``[B, 1, N, N]``, True where query ``i`` may
    attend to key ``j`` (both used, or ``i = j``: a token not used attends to itself only). No gradient."""
    used = rows.detach()[..., 0] > 0.5
    both = used[:, :, None] & used[:, None, :]
    eye = torch.eye(rows.shape[1], dtype=torch.bool, device=rows.device)
    return (both | eye)[:, None]


@graph_op()
def combine_masks(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    """One SDPA mask applying both ``first`` (boolean or additive) and the boolean ``second`` (None: no mask)."""
    if first is None or second is None:
        return second if first is None else first
    if first.dtype == torch.bool:
        return first & second
    return first.masked_fill(~second, float("-inf"))


@graph_op()
def mask_logits(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Attention ``logits`` ``[B, H, N, N]`` with the boolean ``mask`` applied (False → −inf; None: as they are)."""
    return logits if mask is None else with_attn_mask(logits, mask)


@graph_op()
def sublayer_gate(tokens: Tensor, layers: Tensor, which: int) -> Tensor:
    """The factor on a sub-layer's output ``[B, N, C]``: the per-row decisions ``tokens`` ``[B, N, 1]`` times the
    sub-layer's decision ``layers[:, which]`` (``layers`` ``[B, 2]``: attention, MLP): ``[B, N, 1]``."""
    return tokens * layers[:, which, None, None]


def refuse_jit_trace() -> None:
    """Raise within ``torch.jit.trace`` (also the TorchScript ONNX exporter): what an op whose shapes depend on the
    data chose for the example inputs would be kept for every input."""
    if torch.jit.is_tracing():
        raise FxPruneError(
            "the model skips what each image does not use, so its shapes depend on the data, and torch.jit.trace "
            "would keep the example inputs' choices for every input; transform it with the method's static setting "
            "for tracing and export (AdaViT: skip=False, which masks instead)"
        )


def _every_row(rows: Tensor | None, sublayers: Tensor | None, which: int, empty: bool = False
               ) -> tuple[None, None, None]:
    return None, None, None


@graph_op(worst_case=_every_row)
def used_layout(
    rows: Tensor | None, sublayers: Tensor | None, which: int, empty: bool = False
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Where a sub-layer is used: ``(images, index, valid)``. ``images`` ``[b]`` are the images that use sub-layer
    ``which`` (``sublayers`` ``[B, 2]``: attention, MLP; None: every image); ``index`` ``[b, K]`` their used rows
    (``rows`` ``[B, N, 1]``, 1 or True = used), first to last, padded to the most rows an image uses with slots that
    point at row 0 and are not ``valid``. None stands for all: ``images`` when every image uses the sub-layer,
    ``index`` and ``valid`` when every one of them uses every row, ``valid`` alone when there is one image (no
    padding). When no image uses it: no images (``empty``, for a sub-layer that is then not run), or one slot of
    image 0 that is not valid (shapes are never empty: the sub-layer runs on one row whose result is dropped).
    ``rows`` may be None where no image uses either sub-layer (the rows were not decided). An empty batch: no images.
    The shapes depend on the data (eager only)."""
    refuse_jit_trace()
    decided = sublayers if rows is None else rows
    if decided.shape[0] == 0:  # an empty batch: no image uses it
        return torch.zeros(0, dtype=torch.long, device=decided.device), None, None
    if decided.shape[0] == 1:
        return _used_layout_of_one(rows, sublayers, which, empty)
    images = None
    if sublayers is not None and not bool(sublayers[:, which].all()):
        images = sublayers[:, which].nonzero().flatten()
        if images.numel() == 0 and empty:
            return images, None, None
        if images.numel() == 0:
            nothing = torch.zeros(1, 1, dtype=torch.long, device=sublayers.device)
            return nothing[0], nothing, nothing.bool()
    used = _used((rows if images is None else rows.index_select(0, images))[..., 0])
    if bool(used.all()):
        return images, None, None
    if used.shape[0] == 1:  # one image: its used rows, in order, none padded
        return images, used[0].nonzero().T, None
    count = used.sum(dim=1)
    order = (~used).to(torch.uint8).argsort(dim=1, stable=True)[:, : int(count.max())]
    valid = torch.arange(order.shape[1], device=rows.device) < count[:, None]
    return images, torch.where(valid, order, 0), valid


def _used(decisions: Tensor) -> Tensor:
    """Decisions as booleans: as they are, or ``> 0.5`` for 0/1 in a floating dtype."""
    return decisions if decisions.dtype == torch.bool else decisions > 0.5


def _used_layout_of_one(
    rows: Tensor | None, sublayers: Tensor | None, which: int, empty: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:func:`used_layout` of one image (``rows`` ``[1, N, 1]``), from the fewest ops: its used rows need no
    padding, and a sub-layer it does not use has no images or one invalid slot."""
    if sublayers is not None and not sublayers[0, which].item():
        nothing = torch.zeros(1, 1, dtype=torch.long, device=sublayers.device)
        return (nothing[0, :0], None, None) if empty else (nothing[0], nothing, nothing.bool())
    index = _used(rows[0, :, 0]).nonzero().T
    return None, (None if index.shape[1] == rows.shape[1] else index), None


def _as_laid_out(heads: Tensor | None, images: Tensor | None, index: Tensor | None, valid: Tensor | None
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    return images, index, valid


@graph_op(worst_case=_as_laid_out)
def one_row_without_heads(
    heads: Tensor | None, images: Tensor | None, index: Tensor | None, valid: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The layout to compute a sub-layer on, from the layout ``(images, index, valid)`` it is used in
    (:func:`used_layout`): where no image uses a head (``heads`` ``[h]``, the heads any image uses, empty) a
    sub-layer that reads its rows only through its heads gives one result for every row of every image, so one slot
    of the first image (valid where that slot is) stands for them all, and :func:`add_used_rows` adds it at each;
    else the layout as it is. No images stay no images, and no heads (None: not decided, as for a block no image
    uses) the layout as it is."""
    if heads is None or heads.shape[0] > 0 or (images is not None and images.shape[0] == 0):
        return images, index, valid
    first = torch.zeros(1, dtype=torch.long, device=heads.device)
    return (first if images is None else images[:1], first[:, None] if index is None else index[:1, :1],
            None if valid is None else valid[:1, :1])


@graph_op()
def batch_rows(x: Tensor, images: Tensor | None) -> Tensor:
    """The images ``images`` ``[b]`` of ``x`` ``[B, …]`` (or ``[1, …]``, the same for every image): ``[b, …]``
    (``images`` None: all; ``x`` None stays None)."""
    if images is None or x is None:
        return x
    if x.shape[0] == 1:
        return x.expand(images.shape[0], *x.shape[1:])
    return x.index_select(0, images)


@graph_op()
def take_rows(x: Tensor, index: Tensor | None, dim: int) -> Tensor:
    """The rows ``index`` ``[b, K]`` of each image of ``x`` along its token axis ``dim``: ``x`` ``[b, …, N, …]`` (or
    ``[1, …]``, broadcast) → ``[b, …, K, …]`` (``index`` None: all)."""
    if index is None:
        return x
    if index.shape[0] == 1 and x.shape[0] == 1:  # one image: a plain selection
        return x.index_select(dim, index[0])
    x = x.expand(index.shape[0], *x.shape[1:]).movedim(dim, 1)
    flat = x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))
    taken = flat.gather(1, index[:, :, None].expand(-1, -1, flat.shape[2]))
    return taken.reshape(index.shape[0], index.shape[1], *x.shape[2:]).movedim(1, dim)


@graph_op()
def valid_keys(valid: Tensor | None) -> Tensor | None:
    """The SDPA mask of a padded layout, ``valid`` ``[b, K]``: ``[b, 1, 1, K]``, True for the keys that are rows
    (None: no padding, no mask)."""
    return None if valid is None else valid[:, None, None, :]


def _same_as_residual(residual: Tensor, *layout: Tensor, in_place: bool = False) -> Tensor:
    return torch.empty_like(residual)


def _index_add(x: Tensor, index: Tensor, source: Tensor, in_place: bool) -> Tensor:
    """``x`` with ``source``'s rows added at rows ``index`` of its first axis: into ``x`` itself (``in_place``), in
    the dtype ``x + source`` has (under autocast a sub-layer's output can be of a lower precision than the
    residual). ``source`` is made contiguous first: on the CPU, adding an expanded one (one row for every slot)
    takes several times as long as copying it and adding the copy."""
    dtype = torch.promote_types(x.dtype, source.dtype)
    x, source = x.to(dtype), source.to(dtype).contiguous()
    return x.index_add_(0, index, source) if in_place else x.index_add(0, index, source)


@graph_op(worst_case=_same_as_residual)
def add_used_rows(
    residual: Tensor, update: Tensor, images: Tensor | None, index: Tensor | None, valid: Tensor | None,
    in_place: bool = False,
) -> Tensor:
    """``residual`` ``[B, N, C]`` plus a sub-layer's ``update`` ``[b, K, C]`` computed on the used rows: slot ``k`` of
    image ``i`` adds to row ``index[i, k]`` of image ``images[i]``; slots that are not ``valid`` add nothing (None:
    all, as :func:`used_layout`; ``update`` None: a sub-layer no image used, nothing to add; ``update`` ``[1, 1, C]``:
    the same row at every slot, as :func:`one_row_without_heads` lays it out). ``in_place``: the sum
    is made in ``residual``'s own memory, which nothing reads afterwards (:func:`fxprune.passes.skipping.
    add_in_place` decides), unless a gradient is to flow through it, the dtypes differ or ``residual`` is not
    contiguous (an expanded view has rows that share memory)."""
    if update is None:
        return residual
    if update.shape[0] == update.shape[1] == 1:  # one row for every slot (one_row_without_heads), or one slot
        update = update.expand(residual.shape[0] if images is None else images.shape[0],
                               residual.shape[1] if index is None else index.shape[1], update.shape[2])
    in_place = in_place and update.dtype == residual.dtype and residual.is_contiguous() and not (
        torch.is_grad_enabled() and (residual.requires_grad or update.requires_grad))
    if index is None and images is None:
        return residual.add_(update) if in_place else residual + update
    if index is None:
        return _index_add(residual, images, update, in_place)
    if valid is None and residual.shape[0] == 1 and index.shape[0] == 1:  # one image, no padding
        return _index_add(residual[0], index[0], update[0], in_place)[None]
    if images is None:
        images = torch.arange(residual.shape[0], device=residual.device)
    tokens = residual.shape[1]
    slots = images[:, None] * tokens + index
    if valid is not None:  # a slot with no valid key holds NaN: left out, not multiplied
        slots, update = slots[valid], update[valid]
    rows = residual.reshape(-1, residual.shape[2])  # a view where residual is contiguous
    return _index_add(rows, slots.flatten(), update.reshape(-1, update.shape[-1]), in_place).view_as(residual)


def _all_heads(per_head: Tensor) -> Tensor:
    return torch.arange(per_head.shape[1], device=per_head.device)


@graph_op(worst_case=_all_heads)
def used_heads(per_head: Tensor) -> Tensor:
    """The heads any image uses (``per_head`` ``[b, H, 1, 1]``): indices ``[h]``."""
    refuse_jit_trace()
    used = per_head.flatten() if per_head.shape[0] == 1 else per_head.flatten(1).amax(dim=0)
    return used.nonzero().flatten()


@graph_op()
def select_heads(x: Tensor, heads: Tensor) -> Tensor:
    """The heads ``heads`` ``[h]`` of ``x`` ``[b, H, N, d]``: ``[b, h, N, d]``."""
    return x.index_select(1, heads)


@graph_op()
def mask_at_heads(mask: Tensor, heads: Tensor, num_heads: int) -> Tensor:
    """An attention mask or bias ``mask`` at the heads ``heads`` ``[h]``: ``[B, h, …]`` where it has a row per head
    (``[B, num_heads, …]``), else as it is (shared by the heads)."""
    return mask.index_select(1, heads) if mask.dim() == 4 and mask.shape[1] == num_heads > 1 else mask


@graph_op()
def place_heads(x: Tensor, heads: Tensor, num_heads: int) -> Tensor:
    """``x`` ``[b, h, N, d]`` written at the heads ``heads`` of ``[b, num_heads, N, d]`` zeros."""
    full = x.new_zeros(x.shape[0], num_heads, *x.shape[2:])
    return full.index_copy(1, heads, x)


def _merged(runs: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """``runs`` ``(first, length)`` with each run that continues the one before joined to it."""
    merged: list[tuple[int, int]] = []
    for first, length in runs:
        if merged and merged[-1][0] + merged[-1][1] == first:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((first, length))
    return tuple(merged)


_REMEMBERED = 256  # tables, and head sets per table, that the table functions remember


def _per_table(fn: Callable[[Any, tuple[int, ...] | None], Any]) -> Callable[[Any, tuple[int, ...] | None], Any]:
    """``fn(table, heads)`` remembered for each table object and head set: a graph passes its tables as constants,
    the same object on every call, so a table is found by its identity (hashing a table of every channel costs more
    than the rest of a layer's bookkeeping)."""
    remembered: dict[int, tuple[Any, dict[tuple[int, ...] | None, Any]]] = {}

    @functools.wraps(fn)
    def lookup(table: Any, heads: tuple[int, ...] | None) -> Any:
        entry = remembered.get(id(table))
        if entry is None or entry[0] is not table:
            if len(remembered) >= _REMEMBERED:
                remembered.clear()
            entry = remembered[id(table)] = (table, {})
        results = entry[1]
        if heads not in results:
            if len(results) >= _REMEMBERED:
                results.clear()
            results[heads] = fn(table, heads)
        return results[heads]

    return lookup


def _head_set(heads: Tensor, count: int) -> tuple[int, ...] | None:
    """The heads ``heads`` ``[h]`` of ``count`` as a tuple, or None for every head (the case example values take, as
    :func:`used_heads` sorts its heads: read without data)."""
    return None if heads.shape[0] == count else tuple(heads.tolist())


@_per_table
def _columns(channels: tuple[tuple[int, ...], ...], heads: tuple[int, ...] | None) -> tuple[tuple[int, int], ...]:
    """The channels of ``heads`` (None: every head; ``channels`` ``[H][d]``), in order, as runs ``(first, length)``
    of consecutive channels (one run, a slice, in the usual layouts)."""
    chosen = range(len(channels)) if heads is None else heads
    return _merged((channel, 1) for head in chosen for channel in channels[head])


@_per_table
def _joint_rows(tables: tuple[tuple[tuple[int, ...], ...], ...], heads: tuple[int, ...] | None
                ) -> tuple[tuple[int, int], ...]:
    """The channels of ``heads`` of each table in turn, as runs (one slice for every head of a fused q, k, v layer)."""
    return _merged(run for channels in tables for run in _columns(channels, heads))


@functools.lru_cache(maxsize=256)
def _head_channels(num_heads: int, head_dim: int) -> tuple[tuple[int, ...], ...]:
    """Head ``h``'s channels ``h·d … (h+1)·d − 1``, for each head: ``[H][d]``."""
    return tuple(tuple(range(h * head_dim, (h + 1) * head_dim)) for h in range(num_heads))


@functools.lru_cache(maxsize=1024)
def _run_index(runs: tuple[tuple[int, int], ...], device: torch.device) -> Tensor:
    """The channels of ``runs`` ``(first, length)``, in order, as an index ``[Σ length]`` on ``device``."""
    return torch.tensor([c for first, length in runs for c in range(first, first + length)], device=device)


def _take(x: Tensor, dim: int, runs: tuple[tuple[int, int], ...]) -> Tensor:
    """The channels ``runs`` of ``x`` along ``dim``, in order: a view for one run, a gathered copy for several (one
    op, where a product per run would cost one op each)."""
    return x.narrow(dim, *runs[0]) if len(runs) == 1 else x.index_select(dim, _run_index(runs, x.device))


@graph_op()
def project_heads(
    x: Tensor, weight: Tensor, bias: Tensor | None, tables: tuple[tuple[tuple[int, ...], ...], ...], heads: Tensor
) -> tuple[Tensor, ...]:
    """The heads ``heads`` ``[h]`` of one or more outputs of a linear layer (q, k, v of a fused layer), computed
    alone: ``x`` ``[B, N, C]``, the layer's ``weight``/``bias``, ``tables[i][head]`` output ``i``'s channels for each
    element of a head. One ``[B, h, N, d]`` per table, from one product with those rows of the weight (a slice
    where they are consecutive, as for every head of a fused q, k, v layer)."""
    rows = _joint_rows(tables, _head_set(heads, len(tables[0])))
    size, head_dim = heads.shape[0], len(tables[0][0])
    if not rows:  # no head used
        return tuple(x.new_zeros(x.shape[0], 0, x.shape[1], head_dim) for _ in tables)
    out = torch.nn.functional.linear(x, _take(weight, 0, rows), None if bias is None else _take(bias, 0, rows))
    return tuple(chunk.view(x.shape[0], x.shape[1], size, head_dim).transpose(1, 2)
                 for chunk in out.split(size * head_dim, dim=-1))


def _linear_on_columns(
    x: Tensor, weight: Tensor, bias: Tensor | None, columns: Sequence[tuple[int, int]], starts: Sequence[int],
    factor: Tensor | None = None,
) -> Tensor:
    """``linear(x', weight[:, columns], bias)`` for ``x`` ``[…, c]``, where ``x'`` joins, for each run ``(first,
    length)`` of ``columns``, the ``length`` channels of ``x`` from ``starts[run]``, each times the matching channels
    of ``factor`` ``[…, Σ length]`` (None: as they are): ``[…, out]``. One product per run on a view of the weight's
    columns, summed (a gathered copy of strided columns costs more than the product it feeds)."""
    out_features, rows = weight.shape[0], math.prod(x.shape[:-1])
    total = None
    offset = 0
    for (first, length), start in zip(columns, starts):
        part = x.narrow(-1, start, length)
        if factor is not None:
            part = part * factor.narrow(-1, offset, length)
        columns_t = weight.narrow(1, first, length).t()
        part = part.reshape(rows, length)
        if total is None:  # the first run makes the sum (with the bias); the others add to it in place
            total = part @ columns_t if bias is None else torch.addmm(bias, part, columns_t)
        else:  # in the dtype of the first product (under autocast, a lower precision than the weight's)
            total.addmm_(part.to(total.dtype), columns_t.to(total.dtype))
        offset += length
    if total is None:
        total = x.new_zeros(rows, out_features) if bias is None else bias.expand(rows, out_features).clone()
    return total.view(*x.shape[:-1], out_features)


def _starts(runs: Sequence[tuple[int, int]]) -> list[int]:
    """Where each run ``(first, length)`` begins when the runs are laid side by side."""
    return [sum(length for _, length in runs[:i]) for i in range(len(runs))]


@graph_op()
def project_from_heads(
    x: Tensor, weight: Tensor, bias: Tensor | None, columns: tuple[tuple[int, ...], ...], heads: Tensor
) -> Tensor:
    """A linear layer on the heads ``heads`` ``[h]`` of ``x`` ``[B, h, N, d]`` alone (the others' inputs are zero):
    ``columns[head]`` its input channels for each element of a head: ``[B, N, out]``."""
    joined = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], x.shape[1] * x.shape[3])
    runs = _columns(columns, _head_set(heads, len(columns)))
    return _linear_on_columns(joined, weight, bias, runs, _starts(runs))


@graph_op()
def project_head_channels(
    x: Tensor, weight: Tensor, bias: Tensor | None, heads: Tensor, head_dim: int, factor: Tensor | None
) -> Tensor:
    """A linear layer on the channels of the heads ``heads`` ``[h]`` of ``x`` ``[B, N, H·d]`` alone (the others
    are zero), each image's channels times ``factor`` ``[B, 1, h·d]`` (None: as they are): ``[B, N, out]``."""
    channels = _head_channels(x.shape[2] // head_dim, head_dim)
    runs = _columns(channels, _head_set(heads, len(channels)))
    return _linear_on_columns(x, weight, bias, runs, [first for first, _ in runs], factor)


@graph_op()
def bias_row(weight: Tensor, bias: Tensor | None) -> Tensor:
    """What a linear layer (``weight`` ``[out, in]``, ``bias``) gives a row whose inputs are all zero: ``[1, 1,
    out]``, its bias (None: zeros), in memory of its own (a later in-place op must not change the bias)."""
    return weight.new_zeros(1, 1, weight.shape[0]) if bias is None else bias.view(1, 1, -1).clone()
