"""Policies: what to do to which blocks. Plain frozen dataclasses, validated on construction.

``layers`` are 0-based indices of the model's attention blocks (as listed by ``fxprune.analyse``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, ClassVar

from .analysis import per_key_refusal
from .errors import PolicyError
from .ops.clustering import SEEDINGS
from .ops.merging import tome_merged_tokens
from .ops.sampling import Cap, ats_budget
from .ops.selection import evit_kept_tokens

if TYPE_CHECKING:
    from .analysis import Block

__all__ = ["Policy", "EViT", "TopK", "ToMe", "ATS", "ClusTR", "Compose", "parse_policy"]


def _layers(value: Iterable[int] | int, owner: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        layers = tuple(value)
    except TypeError:
        raise PolicyError(f"{owner}.layers must be a sequence of block indices, got {value!r}") from None
    if not layers:
        raise PolicyError(f"{owner}.layers is empty: name at least one block index")
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise PolicyError(f"{owner}.layers must hold non-negative block indices, got {layer!r}")
    if len(set(layers)) != len(layers):
        raise PolicyError(f"{owner}.layers repeats a block index: {layers}")
    return tuple(sorted(layers))


def _int_per_layer(value: int | Iterable[int], owner: str, minimum: int, meaning: str) -> int | tuple[int, ...]:
    """``value`` as one int or a tuple of ints (one per layer), each at least ``minimum``."""
    single = isinstance(value, int) and not isinstance(value, bool)
    try:
        values = (value,) if single else tuple(value)
    except TypeError:
        values = ()
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values):
        raise PolicyError(f"{owner} must be {meaning} or a list of them (one per layer), got {value!r}")
    return values[0] if single else values


def _check_per_layer(value: int | tuple[int, ...], count: int, owner: str, counted: str = "{} layers") -> None:
    """Refuse a per-layer ``value`` that does not have ``count`` entries (``counted`` names them)."""
    if isinstance(value, tuple) and len(value) != count:
        raise PolicyError(f"{owner} has {len(value)} values for {counted.format(count)}; give one per layer")


def _at_layer(value: int | tuple[int, ...], layers: tuple[int, ...], layer: int) -> int:
    """The setting of block ``layer``: ``value`` itself, or its entry for ``layer`` when given per layer."""
    return value[layers.index(layer)] if isinstance(value, tuple) else value


def _text(value: int | tuple[int, ...]) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _keep_rate(value: float, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise PolicyError(f"{owner}.keep_rate must be in (0, 1], got {value!r}")
    return float(value)


class Policy:
    """Base of all policies: a method applied at the blocks ``layers``."""

    layers: tuple[int, ...]
    method: ClassVar[str] = ""
    needs_class_token: ClassVar[bool] = False
    needs_keys: ClassVar[bool] = False
    pads_tokens: ClassVar[bool] = False  # images keep different numbers of tokens, padded to a common length
    reduces_tokens: ClassVar[bool] = True  # False: the block's token count is unchanged (ClusTR)

    def block_refusal(self, block: Block) -> str | None:
        """Why this policy cannot rewrite ``block`` (beyond the model-wide checks of the plan), or None."""
        return None

    def tokens_out(self, tokens_in: int, prefix: int, layer: int) -> int:
        """Tokens leaving block ``layer`` (one of ``layers``) when it receives ``tokens_in`` (``prefix`` protected)."""
        raise NotImplementedError

    def bind(self, depth: int) -> Policy:
        """This policy for a model of ``depth`` attention blocks (resolves defaults such as "every block")."""
        return self

    def describe(self) -> str:
        """Short description for plan tables."""
        raise NotImplementedError

    def action(self, layer: int) -> str:
        """What this policy does to block ``layer`` (one of ``layers``), for the plan table."""
        return self.describe()

    def plan_notes(self) -> list[str]:
        """Notes for the plan table on what its figures mean for this policy."""
        return []

    def policies(self) -> tuple[Policy, ...]:
        return (self,)


@dataclasses.dataclass(frozen=True)
class EViT(Policy):
    """EViT (Liang et al., ICLR 2022): keep the tokens the class token attends to most, fuse the rest.

    In each chosen block, between attention and MLP, keep ``ceil(keep_rate · (N − P))`` non-prefix
    tokens with the largest head-averaged class attention; with ``fuse`` append one token, the
    attention-weighted sum of the dropped ones.
    """

    keep_rate: float
    layers: tuple[int, ...]
    fuse: bool = True
    method: ClassVar[str] = "evit"
    needs_class_token: ClassVar[bool] = True

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "keep_rate", _keep_rate(self.keep_rate, name))
        object.__setattr__(self, "layers", _layers(self.layers, name))
        if not isinstance(self.fuse, bool):
            raise PolicyError(f"{name}.fuse must be True or False, got {self.fuse!r}")

    def tokens_out(self, tokens_in: int, prefix: int, layer: int) -> int:
        candidates = tokens_in - prefix
        keep = evit_kept_tokens(candidates, self.keep_rate)
        return prefix + keep + (1 if self.fuse and keep < candidates else 0)

    def describe(self) -> str:
        return f"{self.method} keep {self.keep_rate:g}" + (" + fused token" if self.fuse else "")


@dataclasses.dataclass(frozen=True)
class TopK(EViT):
    """Top-K: EViT's class-attention selection without the fused token."""

    keep_rate: float
    layers: tuple[int, ...]
    fuse: bool = dataclasses.field(default=False, init=False)
    method: ClassVar[str] = "topk"


@dataclasses.dataclass(frozen=True)
class ToMe(Policy):
    """ToMe (Bolya et al., ICLR 2023): merge the ``r`` most similar token pairs in each chosen block.

    Between attention and MLP, bipartite soft matching on the keys averaged over heads merges
    ``min(r, (N − P) // 2)`` pairs into size-weighted means; sizes are carried to later blocks and,
    with ``prop_attn``, ``log(size)`` is added to every later attention's logits. ``r`` is one int for
    every chosen block or one per block; ``layers=None`` means every block.
    """

    r: int | tuple[int, ...]
    layers: tuple[int, ...] | None = None
    prop_attn: bool = True
    method: ClassVar[str] = "tome"
    needs_keys: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "r", _int_per_layer(self.r, "ToMe.r", 0, "a non-negative int"))
        if self.layers is not None:
            object.__setattr__(self, "layers", _layers(self.layers, "ToMe"))
            _check_per_layer(self.r, len(self.layers), "ToMe.r")
        if not isinstance(self.prop_attn, bool):
            raise PolicyError(f"ToMe.prop_attn must be True or False, got {self.prop_attn!r}")

    def bind(self, depth: int) -> ToMe:
        if self.layers is not None:
            return self
        _check_per_layer(self.r, depth, "ToMe.r", "the model's {} blocks")
        return ToMe(self.r, tuple(range(depth)), self.prop_attn)

    def r_at(self, layer: int) -> int:
        """Pairs to merge in block ``layer``."""
        return _at_layer(self.r, self.layers, layer)

    def tokens_out(self, tokens_in: int, prefix: int, layer: int) -> int:
        return tokens_in - tome_merged_tokens(tokens_in, prefix, self.r_at(layer))

    def describe(self) -> str:
        return f"{self.method} r {_text(self.r)}" + ("" if self.prop_attn else " (no prop. attn)")


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

    max_tokens: Cap | tuple[Cap, ...] = None
    layers: tuple[int, ...] | None = None
    method: ClassVar[str] = "ats"
    needs_class_token: ClassVar[bool] = True
    pads_tokens: ClassVar[bool] = True

    def __post_init__(self) -> None:
        caps = self.max_tokens if isinstance(self.max_tokens, (tuple, list)) else (self.max_tokens,)
        for cap in caps:
            _check_cap(cap)
        if isinstance(self.max_tokens, list):
            object.__setattr__(self, "max_tokens", tuple(self.max_tokens))
        if self.layers is not None:
            object.__setattr__(self, "layers", _layers(self.layers, "ATS"))
            _check_per_layer(self.max_tokens, len(self.layers), "ATS.max_tokens")

    def bind(self, depth: int) -> ATS:
        if self.layers is not None:
            return self
        layers = tuple(range(depth // 4, depth))
        _check_per_layer(self.max_tokens, len(layers), "ATS.max_tokens", "the {} blocks from a quarter of the depth on")
        return ATS(self.max_tokens, layers)

    def cap_at(self, layer: int) -> Cap:
        """The cap of block ``layer``: a token count, a ratio of its incoming tokens, or None (no cap)."""
        return _at_layer(self.max_tokens, self.layers, layer)

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


@dataclasses.dataclass(frozen=True)
class ClusTR(Policy):
    """ClusTR (Xie et al., 2022): every query attends to ``num_clusters`` clusters of keys and values.

    In each chosen block the non-prefix keys are clustered per image on the head-averaged keys, with
    ``clustering`` ``"dpc"`` (DPC-KNN, the official code's one-pass density peaks clustering) or
    ``"kmeans"`` (farthest-point seeds), then ``iterations`` weighted Lloyd steps (None: 0 for ``"dpc"``,
    3 for ``"kmeans"``); each cluster's key and value are its members' means and ``log(cluster size)``
    is added to its logit. Prefix tokens stay their own clusters; the token count is unchanged. A
    tuple of cluster counts is the multi-scale variant: the heads are split into that many equal
    groups, group ``g`` attending to ``num_clusters[g]`` clusters. ``layers=None`` means every block.
    """

    num_clusters: int | tuple[int, ...]
    layers: tuple[int, ...] | None = None
    iterations: int | None = None
    clustering: str = "dpc"
    method: ClassVar[str] = "clustr"
    needs_keys: ClassVar[bool] = True
    reduces_tokens: ClassVar[bool] = False
    default_iterations: ClassVar[dict[str, int]] = {"dpc": 0, "kmeans": 3}

    def __post_init__(self) -> None:
        meaning = "a positive int (clusters per image; a tuple: one count per head group)"
        object.__setattr__(self, "num_clusters", _int_per_layer(self.num_clusters, "ClusTR.num_clusters", 1, meaning))
        if self.layers is not None:
            object.__setattr__(self, "layers", _layers(self.layers, "ClusTR"))
        if self.clustering not in SEEDINGS:
            raise PolicyError(f"ClusTR.clustering must be one of {', '.join(map(repr, SEEDINGS))}, "
                              f"got {self.clustering!r}")
        if self.iterations is None:
            object.__setattr__(self, "iterations", self.default_iterations[self.clustering])
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise PolicyError(f"ClusTR.iterations must be a non-negative int (Lloyd steps after the clustering) "
                              f"or None, got {self.iterations!r}")

    @property
    def scales(self) -> tuple[int, ...]:
        """Cluster count of each head group (one group unless multi-scale)."""
        return self.num_clusters if isinstance(self.num_clusters, tuple) else (self.num_clusters,)

    def bind(self, depth: int) -> ClusTR:
        return self if self.layers is not None else dataclasses.replace(self, layers=tuple(range(depth)))

    def block_refusal(self, block: Block) -> str | None:
        site, groups = block.attention, len(self.scales)
        if site.num_heads % groups:
            return f"its {site.num_heads} heads cannot be split into {groups} equal groups, one per cluster count"
        return per_key_refusal(site)

    def tokens_out(self, tokens_in: int, prefix: int, layer: int) -> int:
        return tokens_in

    def describe(self) -> str:
        scales = f"{_text(self.num_clusters)} clusters" + (" per head group" if len(self.scales) > 1 else "")
        clustering = {"dpc": "DPC-KNN", "kmeans": "farthest-point k-means"}[self.clustering]
        steps = f", {self.iterations} Lloyd iterations" if self.iterations else ""
        return f"{self.method} {scales} ({clustering}{steps})"


@dataclasses.dataclass(frozen=True)
class Compose:
    """Several policies on disjoint sets of blocks, e.g. ``Compose([ToMe(8, layers=range(4)), EViT(0.7, (6, 9))])``."""

    parts: tuple[Policy, ...]

    def __init__(self, parts: Sequence[Policy]):
        parts = tuple(parts)
        if not parts:
            raise PolicyError("Compose needs at least one policy")
        seen: dict[int, Policy] = {}
        for part in parts:
            if not isinstance(part, Policy):
                raise PolicyError(f"Compose takes policies, got {part!r}")
            if part.layers is None:
                raise PolicyError(f"Compose: {part.describe()} has layers=None (every block); name its layers")
            for layer in part.layers:
                if layer in seen:
                    raise PolicyError(
                        f"Compose: block {layer} is claimed by both {seen[layer].describe()} and {part.describe()}"
                    )
                seen[layer] = part
        object.__setattr__(self, "parts", parts)

    def policies(self) -> tuple[Policy, ...]:
        return self.parts

    def bind(self, depth: int) -> Compose:
        return self

    def describe(self) -> str:
        return " | ".join(p.describe() for p in self.parts)


_POLICIES: dict[str, type[Policy]] = {"evit": EViT, "topk": TopK, "tome": ToMe, "ats": ATS, "clustr": ClusTR}
_KEYS = {
    "keep": "keep_rate", "keep_rate": "keep_rate", "layers": "layers", "fuse": "fuse", "r": "r",
    "prop_attn": "prop_attn", "k": "max_tokens", "max_tokens": "max_tokens", "m": "num_clusters",
    "num_clusters": "num_clusters", "iterations": "iterations", "clustering": "clustering",
}


def _parse_layers(values: list[str]) -> tuple[int, ...]:
    """Block indices from ``["3", "6", "9"]`` or ranges ``["3-11"]`` (both ends included), mixed freely."""
    layers: list[int] = []
    for value in values:
        first, dash, last = value.partition("-")
        layers.extend(range(int(first), int(last) + 1) if dash else [int(value)])
    return tuple(layers)


def _parse_cap(value: str) -> int | float | None:
    """An ATS cap: ``none`` (no cap), a ratio such as ``0.7``, or a token count such as ``139``."""
    if value.lower() == "none":
        return None
    return float(value) if "." in value else int(value)


def parse_policy(text: str) -> Policy | Compose:
    """Parse ``"evit:keep=0.7,layers=3,6,9"``; several policies are joined by ``+``."""
    parts = [p.strip() for p in text.split("+") if p.strip()]
    if len(parts) > 1:
        return Compose([parse_policy(p) for p in parts])
    name, _, rest = text.strip().partition(":")
    cls = _POLICIES.get(name.strip().lower())
    if cls is None:
        raise PolicyError(f"unknown policy {name!r}; known: {', '.join(_POLICIES)}")
    fields: dict[str, list[str]] = {}
    key = None
    for item in filter(None, (i.strip() for i in rest.split(","))):
        if "=" in item:
            raw, _, value = item.partition("=")
            key = _KEYS.get(raw.strip())
            if key is None:
                raise PolicyError(f"{name}: unknown option {raw.strip()!r}; known: {', '.join(_KEYS)}")
            fields[key] = [value.strip()]
        elif key is not None:
            fields[key].append(item)
        else:
            raise PolicyError(f"{name}: expected key=value, got {item!r}")
    kwargs: dict[str, object] = {}
    for key, values in fields.items():
        try:
            if key == "layers":
                kwargs[key] = _parse_layers(values)
            elif key == "keep_rate":
                kwargs[key] = float(values[0])
            elif key in ("fuse", "prop_attn"):
                kwargs[key] = values[0].lower() in ("1", "true", "yes")
            elif key == "max_tokens":
                kwargs[key] = _parse_cap(values[0]) if len(values) == 1 else tuple(_parse_cap(v) for v in values)
            elif key in ("r", "num_clusters"):
                kwargs[key] = int(values[0]) if len(values) == 1 else tuple(int(v) for v in values)
            elif key == "iterations":
                kwargs[key] = int(values[0])
            elif key == "clustering":
                kwargs[key] = values[0].lower()
        except ValueError:
            raise PolicyError(f"{name}: bad value for {key}: {','.join(values)!r}") from None
    return cls(**kwargs)
