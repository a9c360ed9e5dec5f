"""The other arguments of a captured model: a graph takes its inputs only, yet a caller may pass the model's
other arguments at the values the graph was captured with.

A capture makes tensors the graph's inputs and runs the model's code with its other arguments at fixed values: the
ones given for the capture, else their defaults. Code that calls the model with its full signature (a Hugging
Face model that calls its vision tower with ``output_attentions=…, return_dict=…``, a trainer passing
``return_dict=True``) passes them too. :class:`CapturedArguments` records, for each such argument, the values that
run the code the graph has: the value fixed, else the default, and for a default of None the value a Hugging Face
model reads from its config in its place (``output_hidden_states=None`` runs as ``config.output_hidden_states``).
:class:`TakesCapturedArguments` lets a graph's call take them, dropping those values and refusing any other with a
:class:`~fxprune.errors.CapturedArgumentError` that names the argument and how to capture it; asked for a method
of the model's class, which a graph of its forward does not have, it says so and what to do.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import CapturedArgumentError

__all__ = ["CapturedArguments", "captured_arguments", "TakesCapturedArguments", "ARGUMENTS"]

ARGUMENTS = "fxprune_arguments"  # the attribute of a graph fxprune made that holds its CapturedArguments
_PLAIN = (bool, int, float, str, type(None))
_SWITCHES = ("output_attentions", "output_hidden_states", "return_dict")  # Hugging Face's, None: the config's


def _same(value: Any, captured: Any) -> bool:
    """Whether ``value`` is ``captured``: the same object, or an equal plain value of the same type."""
    return value is captured or (type(value) is type(captured) and isinstance(value, _PLAIN) and value == captured)


def _described(value: Any) -> str:
    """``value`` in a few words: its repr, or its type (a tensor: its shape)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


@dataclasses.dataclass(frozen=True)
class CapturedArguments:
    """The arguments of ``model``'s forward that a capture did not make inputs: ``values`` maps each one to the
    values that run the captured code (the first the one it ran with); ``inputs`` are the graph's inputs, in order,
    and ``positional`` the forward's positional parameters, in order."""

    model: str
    inputs: tuple[str, ...]
    positional: tuple[str, ...]
    values: Mapping[str, tuple[Any, ...]]
    fixed: frozenset[str] = frozenset()
    methods: frozenset[str] = frozenset()  # the public methods of the model's class beyond nn.Module's

    def passes_others(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
        """Whether a call with ``args`` and ``kwargs`` passes more than the graph's inputs."""
        return len(args) > len(self.inputs) or any(name not in self.inputs for name in kwargs)

    def inputs_of(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The graph's inputs, by name, from a call of the model's forward with ``args`` and ``kwargs``. Raises
        :class:`~fxprune.errors.CapturedArgumentError` for an argument at another value than the captured code
        runs with, or one the forward does not take."""
        if len(args) > len(self.positional):
            raise CapturedArgumentError(
                f"{self.model}.forward takes {len(self.positional)} positional argument(s) "
                f"({', '.join(self.positional)}); this call gives {len(args)}"
            )
        given = {**dict(zip(self.positional, args)), **kwargs}
        for name, value in given.items():
            if name in self.inputs:
                continue
            if name not in self.values:
                raise CapturedArgumentError(
                    f"the captured {self.model} takes no argument {name!r}: its graph takes {', '.join(self.inputs)}"
                    + (f", and {', '.join(self.values)} at the values it was captured with" if self.values else "")
                )
            if not any(_same(value, accepted) for accepted in self.values[name]):
                fixed = " (fixed for the capture)" if name in self.fixed else ""
                raise CapturedArgumentError(
                    f"{self.model} was captured with {name}={self.values[name][0]!r}{fixed}; this call passes {name}="
                    f"{_described(value)}, for which the model runs other code than its graph has. Capture it with "
                    f"that argument: example_inputs={{{', '.join(repr(n) + ': …' for n in self.inputs)}, {name!r}: "
                    "…} (fxprune.transform, fxprune.trace)"
                )
        return {name: value for name, value in given.items() if name in self.inputs}


def _from_config(config: object, name: str) -> Any:
    """The value a Hugging Face model reads from its ``config`` for the argument ``name`` when the caller leaves it
    None or out (``output_hidden_states``: ``config.output_hidden_states``); None where the config has no plain
    value of that name."""
    value = getattr(config, name, None)
    return value if isinstance(value, _PLAIN) else None


def captured_arguments(model: nn.Module, inputs: Sequence[str], fixed: Mapping[str, Any]) -> CapturedArguments:
    """The :class:`CapturedArguments` of ``model`` captured on the inputs ``inputs`` (names of its forward's
    arguments) with the arguments ``fixed``. An argument whose default is not a plain value (a number, string, bool
    or None) is left out: only its absence runs the captured code. A model with a ``config`` whose forward takes
    ``**kwargs`` takes Hugging Face's output switches (:data:`_SWITCHES`) there, at the config's values or None."""
    parameters = inspect.signature(model.forward).parameters.values()
    config = getattr(model, "config", None)
    values: dict[str, tuple[Any, ...]] = {}
    if config is not None and any(p.kind is p.VAR_KEYWORD for p in parameters):
        values.update({name: (value, None) for name in _SWITCHES if (value := _from_config(config, name)) is not None})
    for parameter in parameters:
        default = parameter.default
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) or default is parameter.empty \
                or not isinstance(default, _PLAIN):
            continue
        from_config = _from_config(config, parameter.name) if default is None else None
        values[parameter.name] = (default,) if from_config is None else (default, from_config)
    values.update({name: (value,) for name, value in fixed.items()})
    positional = tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    inputs = tuple(inputs)
    methods = frozenset(name for name, value in inspect.getmembers(type(model), callable)
                        if not name.startswith("_") and not hasattr(nn.Module, name))
    return CapturedArguments(type(model).__name__, inputs, positional,
                             {name: accepted for name, accepted in values.items() if name not in inputs},
                             frozenset(fixed), methods)


class TakesCapturedArguments(nn.Module):
    """A module whose call also takes the other arguments its :class:`CapturedArguments` (the attribute
    :data:`ARGUMENTS`) records, at the values its code runs with: they are dropped, and the call passes its inputs
    by name. A call with its inputs only is passed on as it is. A method of the model's class it does not have
    (timm's ``forward_features``, Hugging Face's ``save_pretrained``) is said to be left out, and what to do."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError as missing:
            arguments = self.__dict__.get(ARGUMENTS)
            if arguments is None or name not in arguments.methods:
                raise
            raise AttributeError(
                f"{arguments.model}.{name} is not kept: a model fxprune captured or transformed is a graph of the "
                f"model's forward alone. Call {name} on the model before transforming it where it changes the model "
                "(as reset_classifier or set_grad_checkpointing do), or transform a module whose forward computes "
                "what it returns (for timm's forward_features: the model made with num_classes=0, global_pool='', "
                "which returns every token)"
            ) from missing

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        arguments = self.__dict__.get(ARGUMENTS)
        if arguments is not None and arguments.passes_others(args, kwargs):
            return super().__call__(**arguments.inputs_of(args, kwargs))
        return super().__call__(*args, **kwargs)
