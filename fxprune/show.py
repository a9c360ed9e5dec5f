"""Pictures of token reduction: for each reduced block, which image patches its tokens still stand for.

Token sources are tracked the way ToMe's authors do it: a membership matrix ``[B, N, N0]`` (row i: the
original tokens that token i stands for) goes through every stream operation next to the tokens.
fxprune's stream operations act on tokens row by row (gather, weighted sums with weights that do not
depend on the tokens), so applying one to the matrix, with the same scores or matches, gives each new
token's sources: the non-zero entries of its row.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from PIL import Image, ImageDraw

from .errors import FxPruneError
from .ops import STREAM_FUNCTIONS

__all__ = ["TokenStep", "token_sources", "kept_counts", "draw_kept_patches"]


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
        if n.op == "call_function" and n.target in STREAM_FUNCTIONS:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            tokens = args[0]
            if self.sources is None:
                eye = torch.eye(tokens.shape[1], dtype=torch.float32, device=tokens.device)
                self.sources = eye.expand(tokens.shape[0], -1, -1)
            result = n.target(self.sources, *args[1:], **kwargs)
            self.sources = result[0] if isinstance(result, tuple) else result
            block = n.meta["fxprune"]["block"]
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


def _tile(image: torch.Tensor, states: torch.Tensor | None, grid: int, scale: int) -> Image.Image:
    """``image`` [3, H, W] in [0, 1]; dropped patches dimmed, merged ones tinted red, kept ones as they are."""
    pixels = image.clamp(0, 1).float().clone()
    if states is not None:
        side = pixels.shape[-1] // grid
        per_pixel = states.view(grid, grid).repeat_interleave(side, 0).repeat_interleave(side, 1)
        pixels = torch.where(per_pixel == 2, pixels, pixels * 0.2)
        pixels[0] = torch.where(per_pixel == 1, 0.35 + 0.65 * pixels[0], pixels[0])
    array = (pixels.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    tile = Image.fromarray(array)
    return tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)


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
    patches = steps[0].sources.shape[-1] - prefix
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise FxPruneError(f"cannot lay out {patches} patch tokens as a square grid")
    tiles = [[_tile(img, None, grid, scale)] for img in images]
    for step in steps:
        states = step.patch_states(prefix)
        for row, (img, state) in enumerate(zip(images, states)):
            tiles[row].append(_tile(img, state, grid, scale))
    width, height, gap, header, footer = tiles[0][0].width, tiles[0][0].height, 6, 28, 24
    size = (len(tiles[0]) * (width + gap) + gap + 40, len(tiles) * (height + gap) + header + footer)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(["input"] + [f"after block {s.block}" for s in steps]):
        draw.text((40 + gap + col * (width + gap), 8), title, fill="black")
    legend = "as is: kept as its own token   red: merged with other patches into one token   dim: dropped"
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
