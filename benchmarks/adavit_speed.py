"""AdaViT on DeiT-S: what skipping the unused heads, sub-layers and patches saves in MACs and in time, on the CPU.

    python benchmarks/adavit_speed.py                            # usage 0.7 and 0.5 of everything, batches 1 and 32
    python benchmarks/adavit_speed.py --usages 0.5 --parts heads,sublayers,tokens,all --batches 1
    python benchmarks/adavit_speed.py --trained adavit_study     # the usage the trained digits models reach
    python benchmarks/adavit_speed.py --batches 1 --threads 1    # one torch thread, as a server of one per request
    python benchmarks/adavit_speed.py --trained adavit_study --usages 0.35 --batches 1 --threads 1 --blocks  # per block
    python benchmarks/adavit_speed.py --trained adavit_study --batches 1 --threads 1 --runs 7  # run-to-run spread

DeiT-S has random weights; its decision heads are set by ``fxprune.methods.adavit.set_usage`` so that each block
uses about the share ``--usages`` of what ``--parts`` names (heads and sub-layers: that share of all of them, at
random; rows: that share of the timing images' rows, through random token heads), the rest all used: the usage a
trained policy reaches, without training.
Executed MACs are counted per image, each image alone (``fxprune.tools.bench.per_image_macs``). Times: each callable
runs the same images (``--images`` of them: one by one at batch 1, as one batch otherwise); dense, skipping
(``skip=True``, eager) and masked (``skip=False``, the official semantics) interleaved, medians of ``--repeats``
rounds, reported as ratios to dense; with ``--runs`` all of it that many times over, each cell the median of the
runs' ratios, and each run's batch-1 ratio listed (how far one run strays on this machine). With ``--compile`` also,
against dense compiled: the masked graph compiled by ``fxprune.lower``, and the skipping graph under
``torch.compile(dynamic=True)``, as a user would compile it (fxprune then runs it eagerly: it has no full graph); the
warm-up rounds include their compilation.
With ``--ceiling`` also, at batch 1, hand-written forwards of what the skipping graph computes for each image,
checked against it: ``decided_forward`` makes the same decisions with the same products (``fxprune.ops.gating``) but
no graph (what the graph's own overhead costs), or with the used heads' weights gathered once per block and head set
and kept (what the per-call head slicing costs); ``ceiling_forward`` has its decisions read beforehand, the used
heads' weights gathered beforehand, no decision heads and no graph (how fast an eager program of these shapes can be
on this machine). With ``--branch-free`` also, at batch 1, ``branch_free_forward``: what the skipping graph
computes, written with no Python branch on a decision, eager and compiled as one graph whose sizes are read from the
data (unbacked), against dense compiled alike (what a skip path without per-op dispatch reaches). With
``--one-row-whole`` also, at batch 1, the skipping graph with its sub-layers that are computed on one row where no
image uses a head run through their whole graphs (``whole_one_row``: what ``without_heads_graphs`` saves). With
``--rows-each-call`` also, at batch 1, the skipping graph computing those sub-layers' rows from biases at each call
(``rows_each_call``: what keeping them for their parameters saves). With
``--blocks`` also, at batch 1, where the time goes: copies of the dense and skipping graphs with a clock read before
each block's first node (``marked``), timed image by image, interleaved; per block its median time per image in
each, and what its decisions use of the timing images (``fxprune.tools.show.usage``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import fxprune
from fxprune.methods.adavit import DECIDED, HEAD_THRESHOLD, SUBLAYER_THRESHOLD, TOKEN_THRESHOLD, set_usage
from fxprune.ops.gating import project_from_heads, project_head_channels, project_heads
from fxprune.passes.common import remove_dead_code, tag_of
from fxprune.passes.learned import LEARNED_PREFIX
from fxprune.passes.skipping import graphs_of, run_if_used
from fxprune.tools.bench import per_image_macs
from fxprune.tools.show import usage as block_usage
from fxprune.tools.speed import Timing, interleaved, machine

_PRODUCTS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::mkldnn_convolution")


def _profile(gm: torch.nn.Module, images: torch.Tensor) -> tuple[float, float, float, list[tuple[str, int, float]]]:
    """(ATen self CPU time per image in milliseconds, its share in matrix products and convolutions, ATen ops per
    image, the ATen ops with the most self CPU time: name, calls and milliseconds per image) of ``gm`` at batch 1."""
    with torch.inference_mode():
        _run(gm, images, True)
        with torch.profiler.profile() as profiler:
            _run(gm, images, True)
    events = sorted((e for e in profiler.key_averages() if e.key.startswith("aten::")),
                    key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    products = sum(e.self_cpu_time_total for e in events if e.key in _PRODUCTS)
    top = [(e.key, round(e.count / len(images)), e.self_cpu_time_total / 1e3 / len(images)) for e in events[:10]]
    return total / 1e3 / len(images), products / total, sum(e.count for e in events) / len(images), top


@dataclasses.dataclass(frozen=True)
class Slices:
    """The weights a block's used heads need, gathered: their channels, the rows of the q, k, v weight and bias, and
    the columns of the output projection's and of fc1's weight."""

    heads: int
    channels: torch.Tensor
    qkv: tuple[torch.Tensor, torch.Tensor]
    projection: torch.Tensor
    fc1: torch.Tensor


def gathered(block: torch.nn.Module, heads: list[int]) -> Slices:
    """:class:`Slices` of the timm ``block`` for its heads ``heads``."""
    attn, d = block.attn, block.attn.head_dim
    channels = torch.tensor([c for h in heads for c in range(h * d, (h + 1) * d)], dtype=torch.long)
    qkv_rows = torch.cat([channels + k * attn.qkv.in_features for k in range(3)])
    qkv = (attn.qkv.weight.index_select(0, qkv_rows), attn.qkv.bias.index_select(0, qkv_rows))
    return Slices(len(heads), channels, qkv, attn.proj.weight.index_select(1, channels),
                  block.mlp.fc1.weight.index_select(1, channels))


@dataclasses.dataclass(frozen=True)
class CeilingStep:
    """What the skipping graph runs of one block for one image: its used rows (None: all), sub-layers, and the
    used heads' :class:`Slices`."""

    block: torch.nn.Module
    rows: torch.Tensor | None
    attention: bool
    mlp: bool
    slices: Slices


def ceiling_steps(model: torch.nn.Module, skipping: torch.nn.Module, image: torch.Tensor) -> list[CeilingStep]:
    """The :class:`CeilingStep` of each block of the timm ViT ``model`` for ``image`` ``[1, 3, H, W]``, read from
    the decisions ``skipping`` (``model`` with AdaViT) makes for it."""
    from fxprune.tools.show import usage

    decided = {used.block: used for used in usage(skipping, image)}
    steps = []
    for index, block in enumerate(model.blocks):
        used = decided.get(index)
        heads = list(range(block.attn.num_heads)) if used is None or used.heads is None else \
            used.heads[0].nonzero().flatten().tolist()
        rows = None if used is None or bool(used.rows[0].all()) else used.rows[0].nonzero().flatten()
        sublayers = [True, True] if used is None or used.sublayers is None else (used.sublayers[0] > 0.5).tolist()
        steps.append(CeilingStep(block, rows, sublayers[0], sublayers[1], gathered(block, heads)))
    return steps


def _add_rows(x: torch.Tensor, update: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``[1, N, C]`` plus ``update`` ``[1, K, C]`` (or ``[1, 1, C]``, the same for each) at its rows ``rows``
    ``[K]`` (None: every row)."""
    return x + update if rows is None else x[0].index_add(0, rows, update[0].expand(len(rows), -1))[None]


_FIRST = torch.zeros(1, dtype=torch.long)


def _computed_rows(rows: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    """The rows a sub-layer that uses ``rows`` (None: all) and ``heads`` heads is computed on: one row where it uses
    none, since it then gives every row the same result (``fxprune.ops.gating.one_row_without_heads``)."""
    return rows if heads else _FIRST if rows is None else rows[:1]


def _ceiling_block(x: torch.Tensor, step: CeilingStep, norm: torch.Tensor | None = None) -> torch.Tensor:
    """``step``'s block on ``x`` ``[1, N, C]``, computing only what it uses with its gathered weights (``norm``:
    the block's first norm of ``x``, computed already)."""
    block, slices, dim = step.block, step.slices, x.shape[-1]
    rows = _computed_rows(step.rows, slices.heads)
    if step.attention:
        y = block.norm1(x if rows is None else x.index_select(1, rows)) if norm is None else \
            norm if rows is None else norm.index_select(1, rows)
        if slices.heads:
            n, d = y.shape[1], block.attn.head_dim
            qkv = F.linear(y, *slices.qkv).view(1, n, 3, slices.heads, d).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(1, n, -1)
            y = F.linear(o, slices.projection, block.attn.proj.bias)
        else:
            y = block.attn.proj.bias.expand(1, y.shape[1], dim)
        x = _add_rows(x, y, step.rows)
    if step.mlp:
        y = block.norm2(x if rows is None else x.index_select(1, rows))
        fc1 = block.mlp.fc1
        y = fc1(y) if slices.heads == block.attn.num_heads else F.linear(
            y.index_select(2, slices.channels), slices.fc1, fc1.bias)
        x = _add_rows(x, block.mlp.fc2(block.mlp.act(y)), step.rows)
    return x


def ceiling_forward(model: torch.nn.Module, steps: list[CeilingStep], image: torch.Tensor) -> torch.Tensor:
    """The logits of the timm ViT ``model`` on ``image`` ``[1, 3, H, W]`` computing only what ``steps`` use, by
    hand: no decisions, no graph, the used heads' weights already gathered. What the skipping graph computes
    (its official semantics), with as few ops as eager PyTorch allows: a ceiling on its speed."""
    x = model._pos_embed(model.patch_embed(image))
    for step in steps:
        x = _ceiling_block(x, step)
    return model.forward_head(model.norm(x))


def _logit(threshold: float) -> float:
    """The logit above which ``sigmoid(logit) > threshold``."""
    return math.log(threshold / (1.0 - threshold))


@functools.lru_cache(maxsize=8)
def _qkv_tables(num_heads: int, head_dim: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """The output channels of each head's elements for q, k and v of a fused timm ``qkv`` layer: ``[3][H][d]``."""
    dim = num_heads * head_dim
    return tuple(tuple(tuple(range(part * dim + h * head_dim, part * dim + (h + 1) * head_dim))
                       for h in range(num_heads)) for part in range(3))


def _decide(x: torch.Tensor, block: torch.nn.Module, decider: torch.nn.Module
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, bool, bool] | None:
    """The decisions of ``decider`` (its ``tokens`` head, and its ``heads`` and ``sublayers`` heads where it has
    them) for one image ``x`` ``[1, N, C]`` entering the timm ``block``, sub-layers first, as the skipping graph
    decides: None for a block that uses neither sub-layer (nothing else decided); else the block's first norm of
    ``x``, the used rows (None: all), the used heads ``[h]``, and whether the attention and the MLP are used."""
    attention = mlp = True
    if hasattr(decider, "sublayers"):
        attention, mlp = (decider.sublayers(x[:, 0])[0] > _logit(SUBLAYER_THRESHOLD)).tolist()
        if not attention and not mlp:
            return None
    norm = block.norm1(x)
    used = decider.tokens(norm[:, 1:])[0, :, 0] > _logit(TOKEN_THRESHOLD)
    rows = None if bool(used.all()) else torch.cat([used.new_ones(1), used]).nonzero()[:, 0]
    heads = (decider.heads(x[:, 0])[0] > _logit(HEAD_THRESHOLD)).nonzero()[:, 0] if hasattr(decider, "heads") \
        else torch.arange(block.attn.num_heads)
    return norm, rows, heads, attention, mlp


def _decided_block(x: torch.Tensor, block: torch.nn.Module, decider: torch.nn.Module) -> torch.Tensor:
    """One timm block on ``x`` ``[1, N, C]`` as the skipping graph runs it: the decisions of ``decider``, then the
    used sub-layers on the used rows and heads, with the graph's head-sliced products."""
    decided = _decide(x, block, decider)
    if decided is None:
        return x
    attn, (norm, used, heads, attention, mlp) = block.attn, decided
    tables = _qkv_tables(attn.num_heads, attn.head_dim)
    rows = _computed_rows(used, heads.shape[0])
    if attention:
        y = norm if rows is None else norm.index_select(1, rows)
        o = F.scaled_dot_product_attention(*project_heads(y, attn.qkv.weight, attn.qkv.bias, tables, heads))
        x = _add_rows(x, project_from_heads(o, attn.proj.weight, attn.proj.bias, tables[0], heads), used)
    if mlp:
        y = block.norm2(x if rows is None else x.index_select(1, rows))
        fc1 = block.mlp.fc1
        y = project_head_channels(y, fc1.weight, fc1.bias, heads, attn.head_dim, None)
        x = _add_rows(x, block.mlp.fc2(block.mlp.act(y)), used)
    return x


def decided_forward(model: torch.nn.Module, skipping: torch.nn.Module, image: torch.Tensor,
                    kept: dict[tuple[int, tuple[int, ...]], Slices] | None = None) -> torch.Tensor:
    """The logits of the timm ViT ``model`` on ``image`` ``[1, 3, H, W]`` as ``skipping`` (``model`` with AdaViT at
    the official blocks) computes them, written by hand: its decision heads and thresholds, with no graph, layouts
    or emitted values; the products head-sliced as the graph slices them (``fxprune.ops.gating``), or, with
    ``kept``, with the used heads' weights gathered once per block and head set and kept there (the ceiling's
    products). What the skipping graph costs beyond the first is the graph's own overhead; the second, against
    the ceiling, is what making the decisions costs."""
    deciders = skipping.get_submodule(LEARNED_PREFIX)
    x = model._pos_embed(model.patch_embed(image))
    for index, block in enumerate(model.blocks):
        decider = deciders.get_submodule(f"blocks_{index}")
        if kept is None:
            x = _decided_block(x, block, decider)
            continue
        decided = _decide(x, block, decider)
        if decided is None:
            continue
        norm, rows, heads, attention, mlp = decided
        key = (index, tuple(heads.tolist()))
        if key not in kept:
            kept[key] = gathered(block, list(key[1]))
        x = _ceiling_block(x, CeilingStep(block, rows, attention, mlp, kept[key]), norm)
    return model.forward_head(model.norm(x))


@torch.library.custom_op("fxprune_benchmarks::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA of ``q``, ``k``, ``v`` ``[B, h, N, d]``, opaque to the compiler: its lowering, and inductor's batched
    products, branch on sizes that a graph with sizes read from the data cannot know."""
    return F.scaled_dot_product_attention(q, k, v)


@_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


def _add_at(x: torch.Tensor, rows: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``x`` ``[1, N, C]`` plus the sum over images of ``update`` ``[a, K, C]`` (``a`` 0 or 1) at its rows ``rows``
    ``[K]``."""
    return x.index_copy(1, rows, x.index_select(1, rows) + update.sum(0, keepdim=True))


def _branch_free_block(x: torch.Tensor, block: torch.nn.Module, decider: torch.nn.Module) -> torch.Tensor:
    """One timm block on ``x`` ``[1, N, C]`` as the skipping graph computes it, with no Python branch on a decision:
    a sub-layer runs on the images that use it (0 or 1), on the used rows (one row where no head is used) and heads,
    each count read from the data, so that the whole forward compiles as one graph with unbacked sizes."""
    attn, dim = block.attn, x.shape[-1]
    norm = block.norm1(x)
    patches = decider.tokens(norm[:, 1:])[0, :, 0] > _logit(TOKEN_THRESHOLD)
    rows = torch.cat([patches.new_ones(1), patches]).nonzero()[:, 0]
    images = [torch.zeros(1, dtype=torch.long)] * 2
    if hasattr(decider, "sublayers"):
        used = decider.sublayers(x[:, 0])[0] > _logit(SUBLAYER_THRESHOLD)
        images = [used[i : i + 1].nonzero()[:, 0] for i in range(2)]
    heads = torch.ones(attn.num_heads, dtype=torch.bool)
    if hasattr(decider, "heads"):
        heads = decider.heads(x[:, 0])[0] > _logit(HEAD_THRESHOLD)
    some, heads = heads.any(), heads.nonzero()[:, 0]
    count, size = rows.shape[0], heads.shape[0] * attn.head_dim
    computed = torch.sym_min(count, 1 + heads.shape[0] * count)  # one row where no head is used
    torch._check(computed <= count)
    computed = rows.narrow(0, 0, computed)
    spread = torch.arange(count) * some  # each used row's computed row
    channels = (heads[:, None] * attn.head_dim + torch.arange(attn.head_dim)).flatten()
    qkv_rows = torch.cat([channels + part * dim for part in range(3)])
    y = norm.index_select(0, images[0]).index_select(1, computed)
    qkv = F.linear(y, attn.qkv.weight.index_select(0, qkv_rows), attn.qkv.bias.index_select(0, qkv_rows))
    q, k, v = qkv.view(y.shape[0], y.shape[1], 3, heads.shape[0], attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    o = _attention(q, k, v).transpose(1, 2).reshape(y.shape[0], y.shape[1], size)
    y = F.linear(o, attn.proj.weight.index_select(1, channels), attn.proj.bias)
    x = _add_at(x, rows, y.index_select(1, spread))
    y = block.norm2(x.index_select(0, images[1]).index_select(1, computed)).index_select(2, channels)
    y = block.mlp.act(F.linear(y, block.mlp.fc1.weight.index_select(1, channels), block.mlp.fc1.bias))
    return _add_at(x, rows, block.mlp.fc2(y).index_select(1, spread))


def branch_free_forward(model: torch.nn.Module, skipping: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The logits of the timm ViT ``model`` on ``image`` ``[1, 3, H, W]`` as ``skipping`` (``model`` with AdaViT at
    the official blocks) computes them, written with no branch on its decisions (:func:`_branch_free_block`)."""
    deciders = skipping.get_submodule(LEARNED_PREFIX)
    x = model._pos_embed(model.patch_embed(image))
    for index, block in enumerate(model.blocks):
        x = _branch_free_block(x, block, deciders.get_submodule(f"blocks_{index}"))
    return model.forward_head(model.norm(x))


def _compiled_whole(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` compiled as one graph (``fullgraph``) whose sizes may be read from the data (``nonzero``), with
    inductor's C++ wrapper (the least per-call overhead on the CPU)."""
    compiled = torch.compile(fn, fullgraph=True, options={"cpp_wrapper": True})

    def run(*args: torch.Tensor) -> torch.Tensor:
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True):
            return compiled(*args)

    return run


def _reached(directory: str, usage: float) -> dict[str, float]:
    """The share of heads, sub-layers and patch rows that the digits ViT models trained at ``usage`` (all three
    kinds decided, every seed in ``directory``) use on the study's 500 test scenes, averaged over the seeds."""
    from adavit_study import ALL, test_images, weights_name
    from fxprune.tools.models import digits_vit
    from fxprune.tools.show import mean_usage
    from fxprune.tools.show import usage as block_usage

    files = sorted(Path(directory).glob(weights_name(usage, ALL, "*")))
    if not files:
        raise SystemExit(f"no AdaViT trained at usage {usage:g} in {directory}: run benchmarks/adavit_study.py")
    scenes, model = test_images(500), digits_vit()
    shares = [mean_usage(block_usage(fxprune.transform(model, fxprune.AdaViT(usage, weights=str(f))), scenes), 1)
              for f in files]
    return {kind: statistics.mean(share[kind] for share in shares) for kind in DECIDED}


def _checked_run(forwards: list[Callable[[], torch.Tensor]], reference: torch.nn.Module, images: torch.Tensor
                 ) -> Callable[[], object]:
    """A callable running ``forwards`` (a forward of each of ``images`` alone), each first checked against
    ``reference`` on its image."""
    with torch.inference_mode():  # as the timing runs them: a compiled forward is compiled once
        for image, forward in zip(images, forwards):
            torch.testing.assert_close(forward(), reference(image[None]), atol=1e-4, rtol=0)

    def run() -> list[torch.Tensor]:
        return [forward() for forward in forwards]

    return run


def _references(model: torch.nn.Module, skipping: torch.nn.Module, images: torch.Tensor
                ) -> dict[str, Callable[[], object]]:
    """The hand-written forwards of ``images`` one by one: with the skipping graph's decisions and its products
    (``decided``) or the ceiling's (``decided, kept slices``), and without decisions (``ceiling``)."""
    kept: dict[tuple[int, tuple[int, ...]], Slices] = {}  # filled by the check, before the timing
    return {
        "decided": _checked_run([functools.partial(decided_forward, model, skipping, image[None]) for image in images],
                                skipping, images),
        "decided, kept slices": _checked_run([functools.partial(decided_forward, model, skipping, image[None], kept)
                                              for image in images], skipping, images),
        "ceiling": _checked_run([functools.partial(ceiling_forward, model, ceiling_steps(model, skipping, image[None]),
                                                   image[None]) for image in images], skipping, images),
    }


def _branch_free(model: torch.nn.Module, skipping: torch.nn.Module, images: torch.Tensor
                 ) -> dict[str, Callable[[], object]]:
    """The forwards of ``images`` one by one with no branch on the decisions (``branch-free``), the same compiled
    as one graph (``whole``), and dense compiled alike (``dense whole``)."""
    whole, dense = _compiled_whole(functools.partial(branch_free_forward, model, skipping)), _compiled_whole(model)
    return {
        name: _checked_run([functools.partial(fn, image[None]) for image in images], reference, images)
        for name, fn, reference in (("branch-free", functools.partial(branch_free_forward, model, skipping), skipping),
                                    ("whole", whole, skipping), ("dense whole", dense, model))
    }


_CLOCK: list[tuple[int, float]] = []  # (block, time) read by the marked graphs


def _mark(block: int) -> None:
    _CLOCK.append((block, time.perf_counter()))


def _block_of(node: torch.fx.Node, names: list[str]) -> int | None:
    """The index of the block (of those called ``names``) that ``node`` computes: fxprune's tag on a node it
    inserted, else the module the node was traced in."""
    tag = tag_of(node)
    if tag is not None:
        return tag.block
    for path, _ in reversed(list((node.meta.get("nn_module_stack") or {}).values())):
        for index, name in enumerate(names):
            if path == name or path.startswith(name + "."):
                return index
    return None


def marked(gm: torch.fx.GraphModule, names: list[str]) -> torch.fx.GraphModule:
    """A copy of ``gm`` that calls ``_mark(i)`` before the first node that computes block ``i`` (of ``names``, in
    order) and ``_mark(len(names))`` before the first node past the last block (or its output): the time from one
    mark to the next is block ``i``'s (before the first mark: the embedding; after the last: the final norm and
    head)."""
    gm = copy.deepcopy(gm)
    reached = -1
    for node in list(gm.graph.nodes):
        block = _block_of(node, names)
        if node.op == "output" or (block is None and reached == len(names) - 1):  # past the last block
            block = len(names)
        if node.op in ("call_function", "call_method", "call_module", "output") and block is not None \
                and block > reached:
            with gm.graph.inserting_before(node):
                gm.graph.call_function(_mark, (block,))
            reached = block
    gm.recompile()
    return gm


def block_times(dense: torch.fx.GraphModule, skipping: torch.fx.GraphModule, images: torch.Tensor, repeats: int
                ) -> list[tuple[str, float, float]]:
    """For the embedding, each block and the head: median milliseconds per image of ``dense`` and ``skipping`` at
    batch 1 (each image alone, the two interleaved, ``repeats`` rounds after two untimed)."""
    names = [row.name for row in skipping.fxprune_plan.rows]
    models = {"dense": marked(dense, names), "skipped": marked(skipping, names)}
    spans: dict[str, list[list[float]]] = {name: [[] for _ in range(len(names) + 2)] for name in models}
    with torch.inference_mode():
        for round_ in range(2 + repeats):
            for name, gm in models.items():
                for image in images:
                    _CLOCK.clear()
                    start = time.perf_counter()
                    gm(image[None])
                    end = time.perf_counter()
                    if round_ < 2:
                        continue
                    assert [block for block, _ in _CLOCK] == list(range(len(names) + 1)), _CLOCK
                    clock = [start, *(t for _, t in _CLOCK), end]
                    for part, (before, after) in enumerate(zip(clock, clock[1:])):
                        spans[name][part].append(1e3 * (after - before))
    labels = ["embedding", *names, "norm and head"]
    return [(label, statistics.median(spans["dense"][part]), statistics.median(spans["skipped"][part]))
            for part, label in enumerate(labels)]


def _blocks_table(model: torch.nn.Module, skipping: torch.nn.Module, images: torch.Tensor, repeats: int) -> str:
    """:func:`block_times` as a markdown table, with what each block's decisions use of ``images``."""
    used, prefix = {block.name: block for block in block_usage(skipping, images)}, skipping.fxprune_plan.prefix_tokens
    lines = ["| part | dense, ms per image | skipped, ms per image | speed ratio | sub-layers used | heads used | "
             "patch rows used |", "|---|---|---|---|---|---|---|"]
    for label, dense, skipped in block_times(fxprune.trace(model, images[:1]), skipping, images, repeats):
        block = used.get(label)
        shares = ["", "", ""] if block is None else [
            "" if values is None else f"{values.mean().item():.2f}"
            for values in (block.sublayers, block.heads, block.rows[:, prefix:])]
        lines.append(f"| {label} | {dense:.3f} | {skipped:.3f} | {dense / skipped:.2f}× | " + " | ".join(shares)
                     + " |")
    return "\n".join(lines)


def _without(skipping: torch.fx.GraphModule, keywords: tuple[str, ...]) -> torch.fx.GraphModule:
    """A copy of ``skipping`` whose calls of ``run_if_used`` do not receive ``keywords``."""
    copied = copy.deepcopy(skipping)
    for gm in graphs_of(copied):  # the top graph and those moved apart (a block's nodes after its decisions)
        for node in gm.graph.find_nodes(op="call_function", target=run_if_used):
            node.kwargs = {key: value for key, value in node.kwargs.items() if key not in keywords}
        remove_dead_code(gm.graph)
        gm.recompile()
    return copied


def whole_one_row(skipping: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``skipping`` whose sub-layers computed on one row where no image uses a head run their whole graphs
    (their head-sliced products on no heads), as before ``fxprune.passes.skipping.without_heads_graphs``."""
    return _without(skipping, ("heads", "without_heads", "fixed"))


def rows_each_call(skipping: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``skipping`` whose rows from biases (a sub-layer no image uses a head of) are computed at each call,
    not kept for their parameters (``fxprune.passes.skipping.parameters_row``)."""
    return _without(skipping, ("fixed",))


@dataclasses.dataclass(frozen=True)
class Runs:
    """Several interleaved timings of the same callables: a speed ratio is the median of each run's."""

    timings: list[Timing]

    def ratios(self, baseline: str, name: str) -> list[float]:
        return [timing.ratio(baseline, name) for timing in self.timings]

    def ratio(self, baseline: str, name: str) -> float:
        return statistics.median(self.ratios(baseline, name))


def _runs_line(usage: float, part: str, ratios: list[float], mac_ratio: float) -> str:
    """Each run's batch-1 speed ratio at ``usage`` of ``part``, and its share of the executed-MAC ratio."""
    shares = [ratio / mac_ratio for ratio in ratios]
    return (f"* usage {usage:g} ({part}), batch 1, skipped, run by run: "
            + ", ".join(f"{ratio:.2f}×" for ratio in ratios) + f" for a MAC ratio of {mac_ratio:.2f}×: "
            f"{min(shares):.2f}–{max(shares):.2f} of it, median {statistics.median(shares):.2f}")


def _run(gm: torch.nn.Module, images: torch.Tensor, one_by_one: bool) -> object:
    return [gm(image[None]) for image in images] if one_by_one else gm(images)


_FLAGS = ("compile", "profile", "ceiling", "branch_free", "one_row_whole", "rows_each_call",
          "blocks")  # switches, in the order shown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--usages", default="0.7,0.5")
    parser.add_argument("--parts", default="all", help="comma-separated: all, heads, sublayers, tokens")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--images", type=int, default=8, help="images timed one by one at batch 1")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--runs", type=int, default=1,
                        help="time everything this many times over (each run interleaved anew); each cell is the "
                             "median over the runs, and each run's batch-1 speed ratio is listed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the masked graph compiled by fxprune.lower and the skipping graph compiled "
                             "as torch.compile(dynamic=True) runs it (eagerly), against dense compiled")
    parser.add_argument("--trained", help="force the usage the digits models trained in this folder reach instead")
    parser.add_argument("--profile", action="store_true",
                        help="also profile dense and skipped at batch 1: share of CPU time in matrix products, ops")
    parser.add_argument("--ceiling", action="store_true",
                        help="also time, at batch 1, hand-written forwards of what the skipping graph computes: "
                             "with its decisions and products but no graph, with its decisions and kept weight "
                             "slices, and with decisions and gathered weights prepared outside the timing (a ceiling)")
    parser.add_argument("--branch-free", action="store_true",
                        help="also time, at batch 1, a hand-written forward of what the skipping graph computes with "
                             "no branch on its decisions, eager and compiled as one graph with sizes read from the "
                             "data, against dense compiled alike (inductor's C++ wrapper)")
    parser.add_argument("--one-row-whole", action="store_true",
                        help="also time, at batch 1, the skipping graph with its one-row sub-layers where no image "
                             "uses a head run through their whole graphs (what without_heads_graphs saves)")
    parser.add_argument("--rows-each-call", action="store_true",
                        help="also time, at batch 1, the skipping graph computing the rows from biases of sub-layers "
                             "no image uses a head of at each call (what keeping them for their parameters saves)")
    parser.add_argument("--blocks", action="store_true",
                        help="also time, at batch 1, each block of the dense and skipping graphs (a clock read "
                             "before each block's first node), with what each block's decisions use")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    batches = [int(b) for b in args.batches.split(",")]
    pool = torch.randn(max(batches + [args.images]), 3, 224, 224)
    single = pool[: args.images]
    trained = f" --trained {args.trained}" if args.trained else f" --parts {args.parts}"
    tuned = "".join(f" --{name} {getattr(args, name)}" for name in ("images", "repeats", "runs", "threads")
                    if getattr(args, name) != parser.get_default(name))
    flags = "".join(f" --{name.replace('_', '-')}" for name in _FLAGS if getattr(args, name))
    print(f"Command: `python benchmarks/adavit_speed.py --usages {args.usages}{trained} --batches {args.batches}"
          f"{flags}{tuned}`  ")
    print(f"Machine: {machine()}  ")
    runs = f"; each cell the median over {args.runs} runs" if args.runs > 1 else ""
    print(f"deit_small_patch16_224 (random weights), AdaViT at the official blocks with its decision heads set to "
          f"the usage shown; {args.images} images at batch 1, medians of {args.repeats} interleaved rounds{runs}.\n")
    compiled = " | batch {b}, masked compiled | batch {b}, skipped compiled" if args.compile else ""
    ceiling = " | batch 1, hand-written with decisions | … and kept slices | batch 1, ceiling" \
        if args.ceiling and 1 in batches else ""
    whole = " | batch 1, branch-free | … compiled whole | … against dense compiled" \
        if args.branch_free and 1 in batches else ""
    variants = {label: build for label, build, wanted in (
        ("one-row sub-layers whole", whole_one_row, args.one_row_whole),
        ("rows from biases each call", rows_each_call, args.rows_each_call)) if wanted and 1 in batches}
    header = "| usage | of | executed MACs (% of dense) | MAC ratio | " + " | ".join(
        f"speed ratio, batch {b}, skipped | batch {b}, masked" + compiled.format(b=b) for b in batches) \
        + ceiling + whole + "".join(f" | batch 1, {label}" for label in variants) + " |"
    print(header)
    print("|---|---|---|---|" + ("---|" * (4 if args.compile else 2)) * len(batches) + ("---|" * 3 if ceiling else "")
          + ("---|" * 3 if whole else "") + "---|" * len(variants))
    dense_macs = per_image_macs(model, single)
    profiles, block_tables, run_lines = [], [], []
    for usage in (float(u) for u in args.usages.split(",")):
        shares = _reached(args.trained, usage) if args.trained else None
        for part in ["reached"] if shares else args.parts.split(","):
            skipping = fxprune.transform(model, fxprune.AdaViT(usage, init_logit=0.0))
            if shares:
                set_usage(skipping, single, shares)
                part = "heads {heads:.2f}, sub-layers {sublayers:.2f}, patches {tokens:.2f}".format(**shares)
            else:
                set_usage(skipping, single, usage, DECIDED if part == "all" else (part,))
            masked = fxprune.transform(model, fxprune.AdaViT(usage, skip=False, init_logit=0.0))
            masked.load_state_dict(skipping.state_dict())
            macs = per_image_macs(skipping, single)
            cells, speeds = [], {}
            models = {"dense": model, "skipped": skipping, "masked": masked}
            if args.compile:
                models.update({"dense compiled": fxprune.lower(model), "masked compiled": fxprune.lower(masked),
                               "skipped compiled": torch.compile(skipping, dynamic=True)})
            for batch in batches:
                images = single if batch == 1 else pool[:batch]
                fns = {name: functools.partial(_run, gm, images, batch == 1) for name, gm in models.items()}
                if ceiling and batch == 1:
                    fns.update(_references(model, skipping, images))
                if whole and batch == 1:
                    fns.update(_branch_free(model, skipping, images))
                if batch == 1:
                    fns.update({label: functools.partial(_run, build(skipping), images, True)
                                for label, build in variants.items()})
                timing = Runs([interleaved(fns, repeats=args.repeats) for _ in range(args.runs)])
                speeds[batch] = timing.ratio('dense', 'skipped')
                if batch == 1 and args.runs > 1:
                    run_lines.append(_runs_line(usage, part, timing.ratios('dense', 'skipped'), dense_macs / macs))
                cells.append(f"{speeds[batch]:.2f}× | {timing.ratio('dense', 'masked'):.2f}×")
                if args.compile:
                    cells += [f"{timing.ratio('dense compiled', name):.2f}×" for name in ("masked compiled",
                                                                                      "skipped compiled")]
                if ceiling and batch == 1:
                    ceiling_cells = [f"{timing.ratio('dense', name):.2f}×"
                                     for name in ("decided", "decided, kept slices", "ceiling")]
                if batch == 1:
                    variant_cells = [f"{timing.ratio('dense', label):.2f}×" for label in variants]
                if whole and batch == 1:
                    whole_cells = [f"{timing.ratio('dense', name):.2f}×" for name in ("branch-free", "whole")] \
                        + [f"{timing.ratio('dense whole', 'whole'):.2f}×"]
            if ceiling:
                cells += ceiling_cells
            if whole:
                cells += whole_cells
            if 1 in batches:
                cells += variant_cells
            print(f"| {usage:g} | {part} | {100 * macs / dense_macs:.1f} | {dense_macs / macs:.2f}× | "
                  + " | ".join(cells) + " |")
            if args.blocks:
                block_tables.append((usage, part, _blocks_table(model, skipping, single, args.repeats)))
            if args.profile:
                profiles.append((usage, part, speeds.get(1, math.nan), _profile(model, single),
                                 _profile(skipping, single)))
    if run_lines:
        print("\n" + "\n".join(run_lines))
    for usage, part, text in block_tables:
        print(f"\nTime per block at batch 1, usage {usage:g} of {part} (a clock read before each block; what "
              f"each block's decisions use, averaged over the images, also where its sub-layers are not run):"
              f"\n\n{text}")
    for usage, part, speed, (dense_aten, dense_share, dense_ops, _), (aten, share, ops, top) in profiles:
        print(f"\nProfile at batch 1, usage {usage:g} of {part}: ATen's own CPU time is dense DeiT-S's divided by "
              f"{dense_aten / aten:.2f}, the whole call's (the speed ratio above) by {speed:.2f}; matrix "
              f"products and convolutions take {100 * share:.0f}% of the skipping graph's ATen CPU time "
              f"({100 * dense_share:.0f}% in dense DeiT-S); {ops:.0f} ATen ops per image ({dense_ops:.0f} dense). "
              "Most self time, per image: "
              + ", ".join(f"{name[6:]} {ms:.2f} ms ({calls})" for name, calls, ms in top) + ".")


if __name__ == "__main__":
    main()
