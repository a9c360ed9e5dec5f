"""Policies: what to do to which blocks. Plain frozen dataclasses, validated on construction.

This module holds what every policy shares: the :class:`Policy` base, :class:`Compose`, the validators of
common fields and the parser of ``"evit:keep=0.7,layers=3,6,9"`` texts, which reads each field's parser from
its :func:`option` metadata. Each method's own policy lives in its module under :mod:`fxprune.methods`.
``layers`` are 0-based indices of the model's attention blocks (as listed by ``fxprune.analyse``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .errors import PolicyError

__all__ = ["Policy", "Compose", "parse_policy", "option"]


def is_int(value: object) -> bool:
    """Whether ``value`` is an int and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_layers(value: Iterable[int] | int, owner: str) -> tuple[int, ...]:
    if is_int(value):
        value = (value,)
    try:
        layers = tuple(value)
    except TypeError:
        raise PolicyError(f"{owner}.layers must be a sequence of block indices, got {value!r}") from None
    if not layers:
        raise PolicyError(f"{owner}.layers is empty: name at least one block index")
    for layer in layers:
        if not is_int(layer) or layer < 0:
            raise PolicyError(f"{owner}.layers must hold non-negative block indices, got {layer!r}")
    if len(set(layers)) != len(layers):
        raise PolicyError(f"{owner}.layers repeats a block index: {layers}")
    return tuple(sorted(layers))


def int_per_layer(value: int | Iterable[int], owner: str, minimum: int, meaning: str) -> int | tuple[int, ...]:
    """``value`` as one int or a tuple of ints (one per layer), each at least ``minimum``."""
    single = is_int(value)
    try:
        values = (value,) if single else tuple(value)
    except TypeError:
        values = ()
    if not values or not all(is_int(v) and v >= minimum for v in values):
        raise PolicyError(f"{owner} must be {meaning} or a list of them (one per layer), got {value!r}")
    return values[0] if single else values


def check_per_layer(value: int | tuple[int, ...], count: int, owner: str, counted: str = "{} layers") -> None:
    """Refuse a per-layer ``value`` that does not have ``count`` entries (``counted`` names them)."""
    if isinstance(value, tuple) and len(value) != count:
        raise PolicyError(f"{owner} has {len(value)} values for {counted.format(count)}; give one per layer")


def at_layer(value: int | tuple[int, ...], layers: tuple[int, ...], layer: int) -> int:
    """The setting of block ``layer``: ``value`` itself, or its entry for ``layer`` when given per layer."""
    return value[layers.index(layer)] if isinstance(value, tuple) else value


def per_layer_text(value: int | tuple[int, ...]) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def check_keep_rate(value: float, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise PolicyError(f"{owner}.keep_rate must be in (0, 1], got {value!r}")
    return float(value)


def check_flag(value: object, owner: str) -> None:
    """Refuse a switch that is not True or False."""
    if not isinstance(value, bool):
        raise PolicyError(f"{owner} must be True or False, got {value!r}")


def option(parse: Callable[[list[str]], Any], *aliases: str, **field: Any) -> Any:
    """A policy field that ``parse_policy`` reads with ``parse`` (its comma-separated values, as strings), also
    under the option names ``aliases``; ``field`` as for ``dataclasses.field`` (e.g. ``default``)."""
    return dataclasses.field(metadata={"parse": parse, "aliases": aliases}, **field)


def parse_layers(values: list[str]) -> tuple[int, ...]:
    """Block indices from ``["3", "6", "9"]`` or ranges ``["3-11"]`` (both ends included), mixed freely."""
    layers: list[int] = []
    for value in values:
        first, dash, last = value.partition("-")
        layers.extend(range(int(first), int(last) + 1) if dash else [int(value)])
    return tuple(layers)


def parse_number(values: list[str]) -> float:
    return float(values[0])


def parse_flag(values: list[str]) -> bool:
    return values[0].lower() in ("1", "true", "yes")


def parse_word(values: list[str]) -> str:
    return values[0].lower()


def parse_text(values: list[str]) -> str:
    """A value as written (a path, say)."""
    return values[0]


def parse_count(values: list[str]) -> int:
    return int(values[0])


def parse_counts(values: list[str]) -> int | tuple[int, ...]:
    """One int, or one per layer."""
    return int(values[0]) if len(values) == 1 else tuple(int(v) for v in values)


class Policy:
    """Base of all policies: a method applied at the blocks ``layers``. A subclass is a frozen dataclass whose
    method is registered (:func:`fxprune.methods.register_method`)."""

    layers: tuple[int, ...] | None

    @property
    def method(self) -> str:
        """The registered name of this policy's method."""
        from .methods import method_of

        return method_of(self).name

    def tokens_out(self, tokens_in: int, prefix: int, layer: int) -> int:
        """Tokens leaving block ``layer`` (one of ``layers``) when it receives ``tokens_in`` (``prefix`` protected)."""
        raise NotImplementedError

    def bind(self, depth: int, patches: int | None = None) -> Policy:
        """This policy for a model of ``depth`` attention blocks and ``patches`` non-prefix tokens entering its first
        block (resolves defaults such as "every block", and counts relative to the model's tokens)."""
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

    def curve(self) -> str:
        """The curve this setting belongs to in ``fxprune bench``'s plot."""
        return self.method

    def policies(self) -> tuple[Policy, ...]:
        return (self,)


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

    def bind(self, depth: int, patches: int | None = None) -> Compose:
        return Compose([part.bind(depth, patches) for part in self.parts])

    def describe(self) -> str:
        return " | ".join(p.describe() for p in self.parts)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    """The option names of ``cls``'s parsable fields (own names and aliases) → field."""
    names: dict[str, dataclasses.Field] = {}
    for field in dataclasses.fields(cls):
        if field.init and "parse" in field.metadata:
            for name in (field.name, *field.metadata["aliases"]):
                names[name] = field
    return names


def _policy_strings(text: str) -> list[str]:
    """``text`` cut at each ``+`` that starts another policy: a method's name, alone or before ``:`` (any name before
    ``:``, so that an unknown one is reported as such); a ``+`` in an option's value, e.g. a file name, stays in it."""
    from .methods import methods

    names = {method.name for method in methods()}
    parts: list[str] = []
    for piece in text.split("+"):
        name, colon, _ = piece.partition(":")
        if not parts or name.strip().lower() in names or (colon and name.strip().isidentifier()):
            parts.append(piece)
        else:
            parts[-1] += "+" + piece
    return [part.strip() for part in parts if part.strip()]


def parse_policy(text: str) -> Policy | Compose:
    """Parse ``"evit:keep=0.7,layers=3,6,9"``; several policies are joined by ``+`` (``+`` and a method's name). The
    method names and each method's options are those registered in :mod:`fxprune.methods`."""
    from .methods import get_method

    parts = _policy_strings(text)
    if len(parts) > 1:
        return Compose([parse_policy(p) for p in parts])
    name, _, rest = text.strip().partition(":")
    cls = get_method(name).policy
    known = _fields(cls)
    values: dict[str, list[str]] = {}
    field = None
    for item in filter(None, (i.strip() for i in rest.split(","))):
        if "=" in item:
            raw, _, value = item.partition("=")
            field = known.get(raw.strip())
            if field is None:
                raise PolicyError(f"{name}: unknown option {raw.strip()!r}; known: {', '.join(known)}")
            values[field.name] = [value.strip()]
        elif field is not None:
            values[field.name].append(item)
        else:
            raise PolicyError(f"{name}: expected key=value, got {item!r}")
    parsers = {field.name: field.metadata["parse"] for field in known.values()}
    kwargs = {}
    for key, strings in values.items():
        try:
            kwargs[key] = parsers[key](strings)
        except ValueError:
            raise PolicyError(f"{name}: bad value for {key}: {','.join(strings)!r}") from None
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs and _required(f)]
    if required:
        raise PolicyError(f"{name} needs {', '.join(f'{field}=' for field in required)}")
    return cls(**kwargs)


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


_MOVED = {"EViT": "evit", "TopK": "evit", "ToMe": "tome", "ATS": "ats", "ClusTR": "clustr"}


def __getattr__(name: str):
    """The built-in policies, which live in their methods' modules, are also importable from here."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f".methods.{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
