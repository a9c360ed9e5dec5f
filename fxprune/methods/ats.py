"""ATS: sample tokens by class attention × value norm, inside the attention where it is fused.

At an SDPA site the sampling runs before the attention, from the same ``q``, ``k``, ``v``, and only the
sampled queries are attended with (:func:`~fxprune.passes.common.select_queries`) — the paper's
placement, and fewer MACs than attending with every query and dropping rows afterwards. At an explicit
``softmax(q @ kᵀ) @ v`` the rows are selected after the residual add instead (same outputs). Either way
the padding slots get size 0 (:func:`~fxprune.ops.ats_pad` is sized), which token-state threading turns into
masked keys in every later attention; it also hands the sizes to every later reduction (ATS included), so
that each image is reduced from its own tokens. Every block places as many points as the model has tokens
at its input (a shape read of the first block's input), as the official code does.
"""

from __future__ import annotations

import dataclasses
import operator

import torch.fx as fx

from ..analysis import Block, TokenProgram
from ..errors import PolicyError
from ..ops import ats_index, ats_pad, gather_tokens
from ..ops.sampling import Cap, ats_budget
from ..passes.common import (
    Rewrite,
    Role,
    can_select_queries,
    insert_call,
    model_tokens,
    reroute_stream,
    select_queries,
    token_scores,
)
from ..policies import Policy, at_layer, check_layers, check_per_layer, option, parse_layers
from .registry import Knob, SweepContext, register_method

__all__ = ["ATS", "ats_from"]


def _parse_cap(value: str) -> Cap:
    """An ATS cap: ``none`` (no cap), a ratio such as ``0.7``, or a token count such as ``139``."""
    if value.lower() == "none":
        return None
    return float(value) if "." in value else int(value)


def parse_caps(values: list[str]) -> Cap | tuple[Cap, ...]:
    """One cap, or one per layer."""
    return _parse_cap(values[0]) if len(values) == 1 else tuple(_parse_cap(v) for v in values)


@dataclasses.dataclass(frozen=True)
class ATS(Policy):
    """ATS (Fayyaz et al., ECCV 2022): sample tokens by significance; each image keeps its own number.

    In each chosen block, significance = class attention × value norm; ``N_ref − P`` evenly spaced points
    on the inverse CDF of the sorted significances (``N_ref`` the tokens entering the model, as the
    official code) each pick the nearest token and repeats collapse, so the number kept adapts to each
    image. ``max_tokens`` caps it (prefix tokens included; the most significant picks stay): a count, a
    ratio in (0, 1] of the image's incoming tokens (``round(ratio · N)``, at least 8), or None for no cap
    (the paper's off-the-shelf setting, where all the reduction comes from the collapse); one value for
    every chosen block or one per block. ``layers=None`` is the official DeiT-S setting: every block from
    a quarter of the depth on (3–11 of 12).
    """

    max_tokens: Cap | tuple[Cap, ...] = option(parse_caps, "k", default=None)
    layers: tuple[int, ...] | None = option(parse_layers, default=None)

    def __post_init__(self) -> None:
        caps = self.max_tokens if isinstance(self.max_tokens, (tuple, list)) else (self.max_tokens,)
        for cap in caps:
            _check_cap(cap)
        if isinstance(self.max_tokens, list):
            object.__setattr__(self, "max_tokens", tuple(self.max_tokens))
        if self.layers is not None:
            object.__setattr__(self, "layers", check_layers(self.layers, "ATS"))
            check_per_layer(self.max_tokens, len(self.layers), "ATS.max_tokens")

    def bind(self, depth: int, patches: int | None = None) -> ATS:
        if self.layers is not None:
            return self
        layers = tuple(range(depth // 4, depth))
        check_per_layer(self.max_tokens, len(layers), "ATS.max_tokens", "the {} blocks from a quarter of the depth on")
        return ATS(self.max_tokens, layers)

    def cap_at(self, layer: int) -> Cap:
        """The cap of block ``layer``: a token count, a ratio of its incoming tokens, or None (no cap)."""
        return at_layer(self.max_tokens, self.layers, layer)

    def tokens_out(self, tokens_in: int, prefix: int, layer: int) -> int:
        kept = ats_budget(tokens_in, self.cap_at(layer))
        if kept <= prefix and kept < tokens_in:
            raise PolicyError(
                f"ATS.max_tokens={self.cap_at(layer)} leaves no room beside the model's {prefix} prefix tokens"
            )
        return kept

    def action(self, layer: int) -> str:
        cap = self.cap_at(layer)
        return f"{self.method} " + ("no cap" if cap is None else f"≤ {_cap_text(cap)} tokens")

    def plan_notes(self) -> list[str]:
        notes = [
            "ats: each image keeps its own number of tokens. The tokens and MACs of its blocks above are the static "
            "layout's (the most any image keeps), which torch.compile runs; eager runs compact each batch to its "
            "largest count and one image runs exactly its own. fxprune.flops on single images gives what each costs."
        ]
        if any(self.cap_at(layer) is None for layer in self.layers):
            notes.append(
                "ats blocks without a cap keep all N rows in the static layout: nothing is saved there under "
                "torch.compile; eager runs save what the collapsed picks leave out."
            )
        return notes

    def describe(self) -> str:
        caps = self.max_tokens if isinstance(self.max_tokens, tuple) else (self.max_tokens,)
        if all(cap is None for cap in caps):
            return f"{self.method} no cap"
        return f"{self.method} ≤ {','.join(_cap_text(cap) for cap in caps)} tokens"


def _check_cap(cap: object) -> None:
    """Refuse an ATS cap that is not a count of at least 2, a ratio in (0, 1] or None."""
    if cap is None:
        return
    if isinstance(cap, float) and 0.0 < cap <= 1.0:
        return
    if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 2:
        return
    raise PolicyError(
        "ATS.max_tokens must be a token count of at least 2 (prefix tokens included), a ratio in (0, 1] of the "
        f"incoming tokens, None (no cap), or a list of them (one per layer); got {cap!r}"
    )


def _cap_text(cap: Cap) -> str:
    return "none" if cap is None else f"{cap:g}·N" if isinstance(cap, float) else str(cap)


def ats_from(depth: int, start: int) -> ATS:
    """ATS without a cap in every block from ``start`` on, of ``depth`` blocks: the official off-the-shelf form
    (``start = depth // 4`` is its DeiT-S setting), with where it starts as the knob."""
    return ATS(None, tuple(range(start, depth)))


def _starts(ctx: SweepContext) -> range:
    return range(ctx.depth)


def _official(ctx: SweepContext) -> list[ATS]:
    return [ATS().bind(ctx.depth)]


@register_method(
    "ats", ATS, scores_tokens=True, pads_tokens=True, carries_sizes=True,
    knob=Knob(lambda ctx, start: ats_from(ctx.depth, start), _starts, extra=_official),
    example=lambda layers: ATS(0.7, layers),
)
def sample_tokens(gm: fx.GraphModule, program: TokenProgram, block: Block, policy: ATS) -> Rewrite:
    """Sample ``block``'s tokens inside its attention (SDPA) or after its residual add; pad (size 0) the slots
    an image does not fill. The sizes entering the block (which mark padding) are wired by token-state threading."""
    inside = can_select_queries(block)
    scores = token_scores(gm, block, program.class_token, before=inside)
    cap = policy.cap_at(block.index)
    args = (scores, block.attention.v, cap, program.prefix_tokens, model_tokens(gm, program))
    pair = insert_call(gm, scores if inside else block.mid, ats_index, args, {"size": None}, block, "ats_index")
    index = insert_call(gm, pair, operator.getitem, (pair, 0), {}, block, "ats_rows", Role.ROWS)
    valid = insert_call(gm, index, operator.getitem, (pair, 1), {}, block, "ats_valid")
    if inside:
        select_queries(gm, block, index)
        source = None
    else:
        source = insert_call(gm, valid, gather_tokens, (block.mid, index), {}, block, "ats_kept")
    return Rewrite(reroute_stream(gm, block, ats_pad, (index, valid), policy.method, source=source), index)
