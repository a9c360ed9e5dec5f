"""Pictures of token reduction: for each reduced block, which image patches its tokens still stand for
(for ClusTR, which patches share a cluster; for AdaViT, which patches, heads and sub-layers each image uses).

Token sources are tracked the way ToMe's authors do it: a membership matrix ``[B, N, N0]`` (row i: the
original tokens that token i stands for) goes through every stream operation next to the tokens.
fxprune's stream operations act on tokens row by row (gather, weighted sums with weights that do not
depend on the tokens), so applying one to the matrix, with the same scores or matches, gives each new
token's sources: the non-zero entries of its row.
"""

from __future__ import annotations

import colorsys
import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from PIL import Image, ImageDraw

from ..errors import FxPruneError
from ..methods.adavit import HEADS_KEY, SUBLAYERS_KEY, TOKENS_KEY
from ..ops import clustered_attention, op_of, padded_cluster_keys_values
from ..ops.clustering import cluster_assignment, key_weights
from ..ops.emitting import collect
from ..passes.common import Role, tag_of

__all__ = [
    "TokenStep", "token_sources", "kept_counts", "draw_kept_patches", "cluster_maps", "draw_clusters", "BlockUsage",
    "mean_usage", "usage", "draw_usage", "draw_patch_masks",
]


@dataclasses.dataclass
class TokenStep:
    """The sources ``[B, N, N0]`` of the tokens leaving one reduced block."""

    block: int
    name: str
    sources: torch.Tensor

    def patch_states(self, prefix: int) -> torch.Tensor:
        """Per image and original patch ``[B, N0 - P]``: 2 kept as its own token, 1 merged into another, 0 dropped."""
        rows = self.sources[:, prefix:, prefix:]
        members = rows > 0
        single = (members.sum(-1) == 1) & (rows.amax(-1) == 1)
        kept = (members & single.unsqueeze(-1)).any(1)
        merged = (members & ~single.unsqueeze(-1)).any(1)
        return torch.where(kept, 2, torch.where(merged, 1, 0))


class _SourceTracker(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.sources: torch.Tensor | None = None
        self.steps: list[TokenStep] = []

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        op, tag = op_of(n.target), tag_of(n)
        if op is not None and op.stream and tag is not None and tag.role is not Role.STATE:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            tokens = args[0]
            if self.sources is None:
                eye = torch.eye(tokens.shape[1], dtype=torch.float32, device=tokens.device)
                self.sources = eye.expand(tokens.shape[0], -1, -1)
            result = n.target(self.sources, *args[1:], **kwargs)
            self.sources = result[0] if isinstance(result, tuple) else result
            block = tag.block
            if self.steps and self.steps[-1].block == block:  # one block's several stream steps: keep its last
                self.steps.pop()
            self.steps.append(TokenStep(block, n.name, self.sources))
        return out


def token_sources(gm: fx.GraphModule, images: torch.Tensor) -> list[TokenStep]:
    """Run ``gm`` (from :func:`fxprune.transform`) on ``images`` and return the token sources after each reduction."""
    tracker = _SourceTracker(gm)
    with torch.inference_mode():
        tracker.run(images)
    if not tracker.steps:
        raise FxPruneError("this model reduces no tokens: nothing to show")
    return tracker.steps


def kept_counts(gm: fx.GraphModule, images: torch.Tensor) -> list[tuple[int, float, int, int]]:
    """Per reduced block: (block, mean, min, max) over ``images`` of the tokens each image keeps.

    Padding (ATS keeps a different number of tokens per image) is not counted; prefix tokens are.
    """
    counts = []
    for step in token_sources(gm, images):
        kept = (step.sources.abs().sum(-1) > 0).sum(-1)
        counts.append((step.block, kept.float().mean().item(), int(kept.min()), int(kept.max())))
    return counts


def _tile(image: torch.Tensor, states: torch.Tensor | None, grid: tuple[int, int], scale: int) -> Image.Image:
    """``image`` [3, H, W] in [0, 1]; dropped patches dimmed, merged ones tinted red, kept ones as they are."""
    pixels = image.clamp(0, 1).float().clone()
    if states is not None:
        per_pixel = _per_pixel(states, grid, pixels.shape[-2:])
        pixels = torch.where(per_pixel == 2, pixels, pixels * 0.2)
        pixels[0] = torch.where(per_pixel == 1, 0.35 + 0.65 * pixels[0], pixels[0])
    return _image(pixels, scale)


def _cluster_tile(image: torch.Tensor, clusters: torch.Tensor, grid: tuple[int, int], scale: int) -> Image.Image:
    """``image`` [3, H, W] in [0, 1] tinted by the cluster of each patch (one colour per cluster)."""
    pixels = image.clamp(0, 1).float()
    palette = torch.tensor([colorsys.hsv_to_rgb((0.618 * c) % 1.0, 0.85, 1.0) for c in range(int(clusters.max()) + 1)])
    colours = palette[_per_pixel(clusters, grid, pixels.shape[-2:])].permute(2, 0, 1)
    return _image(0.45 * pixels + 0.55 * colours, scale)


def _per_pixel(values: torch.Tensor, grid: tuple[int, int], size: torch.Size) -> torch.Tensor:
    """One value per patch ``[rows · columns]`` (``grid``) spread to the pixels ``[H, W]`` (``size``) they cover."""
    rows, columns = grid
    return values.view(rows, columns).repeat_interleave(size[0] // rows, 0).repeat_interleave(size[1] // columns, 1)


def _image(pixels: torch.Tensor, scale: int) -> Image.Image:
    array = (pixels.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    tile = Image.fromarray(array)
    return tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)


def _grid(patches: int, images: torch.Tensor) -> tuple[int, int]:
    """The grid (rows, columns) of ``patches`` square patches over ``images`` ``[M, 3, H, W]``, in the image's
    proportions (a 32 × 48 image in 8-pixel patches: 4 × 6)."""
    height, width = images.shape[-2:]
    for rows in range(1, patches + 1):
        if patches % rows == 0 and rows * width == (patches // rows) * height:
            return rows, patches // rows
    raise FxPruneError(f"cannot lay out {patches} patch tokens as a grid of square patches over {height} × {width} "
                       "pixel images")


def _save_panels(
    tiles: list[list[Image.Image]], titles: list[str], legend: str, path: str | Path, labels: list[str] | None
) -> Path:
    """Write the rows of ``tiles`` (one per image) under ``titles``, with ``legend`` below, as a PNG."""
    width, height, gap, header, footer = tiles[0][0].width, tiles[0][0].height, 6, 28, 24
    size = (len(tiles[0]) * (width + gap) + gap + 40, len(tiles) * (height + gap) + header + footer)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(titles):
        draw.text((40 + gap + col * (width + gap), 8), title, fill="black")
    draw.text((40 + gap, size[1] - footer + 4), legend, fill="black")
    for row, row_tiles in enumerate(tiles):
        top = header + row * (height + gap)
        if labels is not None:
            draw.text((6, top + height // 2 - 6), labels[row], fill="black")
        for col, tile in enumerate(row_tiles):
            canvas.paste(tile, (40 + gap + col * (width + gap), top))
    path = Path(path)
    canvas.save(path)
    return path


def draw_kept_patches(
    gm: fx.GraphModule, images: torch.Tensor, path: str | Path, labels: list[str] | None = None, scale: int = 3
) -> Path:
    """Write a PNG: one row per image, the image and then one panel per reduced block.

    In each panel the patches still carried by a token of their own are shown as they are, patches
    merged with others into one token (ToMe's merges, EViT's fused token) are tinted red, dropped
    patches are dimmed.
    """
    steps = token_sources(gm, images)
    prefix = gm.fxprune_plan.prefix_tokens
    grid = _grid(steps[0].sources.shape[-1] - prefix, images)
    tiles = [[_tile(img, None, grid, scale)] for img in images]
    for step in steps:
        for row, (img, state) in enumerate(zip(images, step.patch_states(prefix))):
            tiles[row].append(_tile(img, state, grid, scale))
    titles = ["input"] + [f"after block {s.block}" for s in steps]
    legend = "as is: kept as its own token   red: merged with other patches into one token   dim: dropped"
    return _save_panels(tiles, titles, legend, path, labels)


class _ClusterRecorder(fx.Interpreter):
    """Records, at each ClusTR node, the clusters of the first head group's keys."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.maps: list[tuple[int, torch.Tensor]] = []

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and n.target in (clustered_attention, padded_cluster_keys_values):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            offset = 1 if n.target is clustered_attention else 0  # its q comes first
            k, _, scales, prefix, clustering, iterations = args[offset : offset + 6]
            k = k.chunk(len(scales), 1)[0]
            weights = key_weights(kwargs.get("attn_mask"), k.shape[0], k.shape[2], torch.float32, k.device)
            clusters = min(scales[0], k.shape[2] - prefix)
            assign = cluster_assignment(k, clusters, prefix, clustering, iterations, weights)
            self.maps.append((tag_of(n).block, assign))
        return super().run_node(n)


def cluster_maps(gm: fx.GraphModule, images: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Run ``gm`` (rewritten with ClusTR) on ``images``: per ClusTR block, (block, the cluster of each
    non-prefix token ``[B, N − P]``) for the first head group (the only one unless multi-scale)."""
    recorder = _ClusterRecorder(gm)
    with torch.inference_mode():
        recorder.run(images)
    if not recorder.maps:
        raise FxPruneError("this model has no ClusTR block: nothing to show")
    return recorder.maps


def draw_clusters(
    gm: fx.GraphModule, images: torch.Tensor, path: str | Path, labels: list[str] | None = None, scale: int = 3
) -> Path:
    """Write a PNG: one row per image, the image and then, per ClusTR block whose tokens are still the
    image's patches, the patches coloured by the cluster their keys fell in (first head group)."""
    patches = gm.fxprune_plan.rows[0].tokens_in - gm.fxprune_plan.prefix_tokens
    grid = _grid(patches, images)
    maps = [(block, clusters) for block, clusters in cluster_maps(gm, images) if clusters.shape[1] == patches]
    if not maps:
        raise FxPruneError("every ClusTR block sees merged or dropped tokens: no patch grid to colour")
    tiles = [[_tile(img, None, grid, scale)] + [_cluster_tile(img, c[row], grid, scale) for _, c in maps]
             for row, img in enumerate(images)]
    titles = ["input"] + [f"clusters, block {block}" for block, _ in maps]
    return _save_panels(tiles, titles, "one colour per cluster of keys (first head group)", path, labels)


@dataclasses.dataclass
class BlockUsage:
    """What one block with usage decisions (AdaViT) uses of each image: its rows ``[B, N]`` (1: used), heads
    ``[B, H]`` and sub-layers ``[B, 2]`` (attention, MLP; None where the block decides rows only)."""

    block: int
    name: str
    rows: torch.Tensor
    heads: torch.Tensor | None = None
    sublayers: torch.Tensor | None = None

    def summary(self) -> str:
        """One line: the mean usage per image (rows also min and max)."""
        counts = self.rows.sum(dim=1)
        text = (f"block {self.block}: {counts.mean():.1f} of {self.rows.shape[1]} rows used per image "
                f"(min {int(counts.min())}, max {int(counts.max())})")
        if self.heads is not None:
            attention, mlp = self.sublayers.mean(dim=0).tolist()
            text += (f", {self.heads.sum(dim=1).mean():.1f} of {self.heads.shape[1]} heads, attention "
                     f"{100 * attention:.0f}%, MLP {100 * mlp:.0f}% of the images")
        return text


def mean_usage(blocks: list[BlockUsage], prefix: int) -> dict[str, float]:
    """The share of each kind that ``blocks`` use, over their images: ``heads`` (of the blocks that decide them),
    ``sublayers`` (of theirs, attention and MLP) and ``tokens`` (of the patch rows, the ``prefix`` rows left out)."""
    deciding = [block for block in blocks if block.heads is not None]
    shares = {"tokens": torch.cat([block.rows[:, prefix:].flatten() for block in blocks]).mean().item()}
    if deciding:
        shares["heads"] = torch.cat([block.heads.flatten() for block in deciding]).mean().item()
        shares["sublayers"] = torch.cat([block.sublayers.flatten() for block in deciding]).mean().item()
    return shares


def usage(gm: fx.GraphModule, images: torch.Tensor) -> list[BlockUsage]:
    """What each block of ``gm`` with usage decisions uses of each of ``images`` (evaluation mode); empty when
    ``gm`` decides no usage."""
    training = gm.training
    with torch.no_grad(), collect() as aux:
        gm.eval()(images)
    gm.train(training)
    index = {row.name: row.index for row in gm.fxprune_plan.rows}

    def of(key: str, name: str) -> torch.Tensor | None:
        values = aux.get(key + name)
        return None if values is None else values[-1].float()

    names = [key[len(TOKENS_KEY):] for key in aux if key.startswith(TOKENS_KEY)]
    return [BlockUsage(index[name], name, of(TOKENS_KEY, name), of(HEADS_KEY, name), of(SUBLAYERS_KEY, name))
            for name in names]


def _usage_tile(image: torch.Tensor, used: BlockUsage, row: int, prefix: int, grid: tuple[int, int],
                scale: int) -> Image.Image:
    """``image`` with the patches ``used`` does not use dimmed, over a strip of squares: its heads, then its
    attention and MLP (green: used, grey: not)."""
    tile = _tile(image, 2 * used.rows[row, prefix:].long(), grid, scale)
    if used.heads is None:
        return tile
    marks = used.heads[row].tolist() + [None] + used.sublayers[row].tolist()
    side = max(4, min(tile.width // (len(marks) + 1), tile.width // 10))
    framed = Image.new("RGB", (tile.width, tile.height + side + 2), "white")
    framed.paste(tile, (0, 0))
    draw = ImageDraw.Draw(framed)
    for position, mark in enumerate(marks):
        if mark is not None:
            left = position * side
            box = (left, tile.height + 2, left + side - 2, tile.height + side)
            draw.rectangle(box, fill=(40, 170, 60) if mark > 0.5 else (200, 200, 200))
    return framed


def draw_usage(
    gm: fx.GraphModule, images: torch.Tensor, path: str | Path, labels: list[str] | None = None, scale: int = 3
) -> Path:
    """Write a PNG: one row per image, the image and then one panel per block with usage decisions (AdaViT): the
    patches it does not use dimmed, and under it one square per head, then its attention and MLP."""
    blocks = usage(gm, images)
    if not blocks:
        raise FxPruneError("draw_usage draws the usage decisions of a model transformed with AdaViT")
    prefix = gm.fxprune_plan.prefix_tokens
    grid = _grid(blocks[0].rows.shape[1] - prefix, images)
    tiles = []
    for row, image in enumerate(images):
        panels = [_usage_tile(image, used, row, prefix, grid, scale) for used in blocks]
        first = _tile(image, None, grid, scale)
        framed = Image.new("RGB", panels[-1].size, "white")
        framed.paste(first, (0, 0))
        tiles.append([framed, *panels])
    titles = ["input"] + [f"block {used.block}" for used in blocks]
    legend = "dim: patch not used in that block   squares: its heads, then attention and MLP (green: used)"
    return _save_panels(tiles, titles, legend, path, labels)


_CLASS_COLOURS = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.2, 0.2], [0.2, 0.4, 1.0]])  # background, digit, distractor


def _mask_tile(image: torch.Tensor, classes: torch.Tensor, grid: tuple[int, int], scale: int) -> Image.Image:
    """``image`` [3, H, W] in [0, 1] under the colour of each patch's class ``classes`` ``[rows · columns]``."""
    colours = _CLASS_COLOURS[_per_pixel(classes, grid, image.shape[-2:])].permute(2, 0, 1)
    return _image(0.4 * image.clamp(0, 1).float() + 0.6 * colours, scale)


def draw_patch_masks(
    images: torch.Tensor, masks: dict[str, torch.Tensor], path: str | Path, labels: list[str] | None = None,
    scale: int = 3,
) -> Path:
    """Write a PNG: one row per image of ``images`` ``[M, 3, H, W]``, the image and then one panel per entry of
    ``masks`` (title → each patch's class ``[M, P]``, as :data:`fxprune.tools.probe.CLASSES`): digit red,
    distractor blue, background dark."""
    grid = _grid(next(iter(masks.values())).shape[-1], images)
    tiles = [[_tile(img, None, grid, scale)] + [_mask_tile(img, mask[row], grid, scale) for mask in masks.values()]
             for row, img in enumerate(images)]
    legend = "red: digit ink   blue: distractor   dark: background"
    return _save_panels(tiles, ["input", *masks], legend, path, labels)
