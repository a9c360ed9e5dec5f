"""Setting search for ``fxprune bench``: each method's settings at a share of the dense MACs, from its spec.

A method's :class:`~fxprune.methods.Knob` is fitted by bisection to the MACs of one fast plan per step, or, for
a method whose images keep different numbers of tokens, to the mean MACs per image on calibration images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..analysis import analyse
from ..capture import reusing_captures
from ..methods import Method, SweepContext, method_of, methods
from ..methods.evit import EViT
from ..methods.tome import ToMe
from ..pipeline import plan, rewrite
from ..planning import Plan
from ..policies import Compose, Policy
from .bench import per_image_macs

__all__ = [
    "fit_policy", "mac_fraction", "sweep_context", "fit_method", "keep_rate_for", "tome_r_for", "default_layers",
    "default_policy", "sweep_policies",
]


@reusing_captures()  # the model is captured once for every step
def fit_policy(
    model: nn.Module,
    family: Callable[[Any], Policy],
    settings: Sequence[Any],
    fraction: float,
    example_inputs: Sequence[torch.Tensor] | None = None,
    calibration: Tensor | None = None,
    fractions: dict[Any, float] | None = None,
) -> Policy:
    """``family(s)`` for the setting ``s`` that leaves the most MACs not above ``fraction`` of the dense MACs.

    ``settings`` must be ordered by increasing MACs (e.g. keep rates ascending, ToMe's ``r`` descending);
    found by bisection. The MACs are the plan's (one fast plan, checked at one batch size, per step), or,
    with ``calibration`` images ``[M, ...]``, their mean per image, each image run alone (for methods that
    keep a different number of tokens per image). When every setting exceeds ``fraction`` the first is
    returned, when none does the last. ``fractions`` (policy → its MAC fraction, filled in) lets fits of the same
    model and calibration images share what they measured.
    """
    fractions = {} if fractions is None else fractions

    def fraction_at(i: int) -> float:
        policy = family(settings[i])
        if policy not in fractions:
            if calibration is not None:
                fractions[policy] = mac_fraction(model, policy, calibration, example_inputs)
            else:
                the_plan: Plan = plan(model, policy, example_inputs, fast=True)
                fractions[policy] = the_plan.macs_after / the_plan.macs_before
        return fractions[policy]

    low, high = 0, len(settings) - 1  # invariant: the answer lies in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fraction_at(middle) <= fraction else (low, middle - 1)
    return family(settings[low])


def mac_fraction(
    model: nn.Module, policy: Policy | Compose, images: Tensor, example_inputs: Sequence[torch.Tensor] | None = None
) -> float:
    """Mean MACs per image of ``model`` transformed by ``policy`` over ``images`` ``[M, ...]`` (each run alone), as
    a fraction of the dense model's."""
    dense = per_image_macs(model, images[:1])
    checked_once = rewrite(model, policy, example_inputs, copy_weights=False, second_batch=False)[0]
    return per_image_macs(checked_once, images) / dense


def sweep_context(
    model: nn.Module, layers: Sequence[int] | None, example_inputs=None, calibration: Tensor | None = None
) -> SweepContext:
    """What the methods' bench settings are chosen from (:class:`~fxprune.methods.SweepContext`); ``layers=None``:
    the default blocks for the model's depth (:func:`default_layers`)."""
    program = analyse(model, example_inputs)
    depth = len(program.blocks)
    return SweepContext(
        model, _quarters(depth) if layers is None else tuple(layers), depth, program.tokens, program.prefix_tokens,
        program.blocks[0].attention.num_heads, example_inputs, calibration,
    )


def fit_method(
    method: Method, ctx: SweepContext, fraction: float, adaptive: bool = False,
    fractions: dict[Any, float] | None = None,
) -> Policy:
    """``method``'s knob fitted to leave at most ``fraction`` of the dense MACs (``adaptive``: by the mean MACs per
    image on ``ctx.calibration``, for a method whose images keep different numbers of tokens; ``fractions`` as
    :func:`fit_policy`, for fits of one kind)."""
    family = partial(method.knob.family, ctx)
    calibration = ctx.calibration if adaptive else None
    return fit_policy(ctx.model, family, method.knob.values(ctx), fraction, ctx.example_inputs, calibration,
                      fractions)


@reusing_captures()
def keep_rate_for(
    model: nn.Module, method: type[EViT], layers: Sequence[int], fraction: float, example_inputs=None
) -> float:
    """The keep rate (a multiple of 0.01) at which ``method(keep_rate, layers)`` leaves at most ``fraction``
    of the dense MACs, as close to it as possible."""
    ctx = sweep_context(model, layers, example_inputs)
    return fit_method(method_of(method), ctx, fraction).keep_rate


@reusing_captures()
def tome_r_for(model: nn.Module, fraction: float, example_inputs=None) -> int:
    """The ``r`` at which ``ToMe(r)`` (every block) leaves at most ``fraction`` of the dense MACs, as close as
    possible."""
    return fit_method(method_of(ToMe), sweep_context(model, (), example_inputs), fraction).r


def _quarters(depth: int) -> tuple[int, ...]:
    return tuple(sorted({depth // 4, depth // 2, 3 * depth // 4}))


def default_layers(model: nn.Module, example_inputs=None) -> tuple[int, ...]:
    """Blocks to reduce by default: a quarter, half and three quarters deep (3, 6, 9 for 12 blocks, as EViT)."""
    return _quarters(len(analyse(model, example_inputs).blocks))


@reusing_captures()
def default_policy(model: nn.Module, fraction: float = 0.70, example_inputs=None) -> EViT:
    """EViT at :func:`default_layers`, keeping the tokens that leave ``fraction`` of the dense MACs."""
    return fit_method(method_of(EViT), sweep_context(model, None, example_inputs), fraction)


@reusing_captures()  # the model is captured once for every fit
def sweep_policies(
    model: nn.Module,
    layers: Sequence[int] | None,
    fractions: Sequence[float] = (0.85, 0.70, 0.55),
    example_inputs=None,
    *,
    calibration: Tensor,
) -> list[Policy]:
    """Every registered method at the settings its spec gives ``fxprune bench``, in three groups:

    1. each method with a knob, fitted to leave (at most, as close as possible) each of ``fractions`` of the
       dense MACs (methods placed at a few blocks, at ``layers``; None: :func:`default_layers`);
    2. each adaptive method (images keep different numbers of tokens) fitted by its mean MACs per image on the
       ``calibration`` images, plus its extra settings, each setting once and followed by the methods of group
       1 placed at ``layers``, fitted to its MACs per image;
    3. each method's fixed settings.
    """
    ctx = sweep_context(model, layers, example_inputs, calibration)
    fitted = [m for m in methods() if m.knob is not None and not m.pads_tokens]
    adaptive = [m for m in methods() if m.knob is not None and m.pads_tokens]
    planned: dict[Any, float] = {}  # each policy's MAC fraction by its plan, and by its calibration images
    calibrated: dict[Any, float] = {}
    policies = [fit_method(method, ctx, f, fractions=planned) for method in fitted for f in fractions]
    for method in adaptive:
        settings = [fit_method(method, ctx, f, adaptive=True, fractions=calibrated) for f in fractions]
        settings += method.knob.extra(ctx) if method.knob.extra is not None else []
        for setting in dict.fromkeys(settings):
            if setting not in calibrated:
                calibrated[setting] = mac_fraction(model, setting, calibration, example_inputs)
            policies += [setting] + [fit_method(m, ctx, calibrated[setting], fractions=planned)
                                     for m in fitted if m.knob.at_layers]
    return policies + [policy for method in methods() if method.settings is not None for policy in method.settings(ctx)]
