"""The method registry: one :class:`Method` spec per token-reduction method, registered with its block rewrite.

A method module (``fxprune/methods/<name>.py``, or a user's own module) holds a policy dataclass, the function
that rewrites one block, and registers that function::

    @register_method("evit", EViT, scores_tokens=True, options={"keep": "keep_rate"})
    def rewrite_block(gm, program, block, policy) -> Rewrite: ...

Everything the rest of fxprune needs to know about a method is in its spec: the command-line name, what it
needs from the model, what it does to the token rows, which blocks it refuses, and how ``fxprune bench`` picks
its settings. The rewrite says which node carries the block's new token stream (a
:class:`~fxprune.passes.common.Rewrite`); the graph functions it inserts declare how token state follows them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import PolicyError
from ..policies import Policy

if TYPE_CHECKING:
    import torch
    import torch.fx as fx
    from torch import nn

    from ..analysis import Block, TokenProgram
    from ..passes.common import Rewrite

__all__ = [
    "Method", "Knob", "SweepContext", "Learned", "register_method",
    "unregister_method", "method_of", "methods", "get_method",
]

BlockRewrite = Callable[["fx.GraphModule", "TokenProgram", "Block", Policy], "Rewrite"]


@dataclasses.dataclass(frozen=True)
class SweepContext:
    """What ``fxprune bench`` knows when it picks settings: the model, the blocks to reduce at (``layers``,
    for methods placed at a few blocks), its depth, example inputs and images to calibrate adaptive methods on."""

    model: nn.Module
    layers: tuple[int, ...]
    depth: int
    tokens: int
    prefix_tokens: int
    num_heads: int
    example_inputs: Sequence[torch.Tensor] | None
    calibration: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class Knob:
    """The setting ``fxprune bench`` fits to a share of the dense MACs: the policy ``family(ctx, value)`` for
    ``values(ctx)``, in order of growing MACs. ``at_layers``: the family places the method at ``ctx.layers``
    (then it is also fitted to the MACs per image of every adaptive method's settings, for comparison).
    ``extra``: settings benchmarked besides the fitted ones (e.g. the paper's own)."""

    family: Callable[[SweepContext, Any], Policy]
    values: Callable[[SweepContext], Sequence[Any]]
    at_layers: bool = False
    extra: Callable[[SweepContext], list[Policy]] | None = None


@dataclasses.dataclass(frozen=True)
class Learned:
    """A method with trained parts. ``modules(policy, block, program)`` builds the submodules of one block
    (created once; the train and eval graphs share them); ``train_rewrite`` rewrites a block for training
    (differentiable, static shapes), the spec's ``rewrite`` for evaluation; ``weights(policy)`` is the file of
    trained weights named by the policy (None: untrained); ``translate(saved, names)`` reads a checkpoint fxprune
    did not write (e.g. the official code's) into the names of the policy's submodules, given in stage order.
    ``loss(teacher, policy, distill_weight, example_inputs)``: the method's training loss, a callable
    ``(images, output, aux, labels) -> (loss, parts)`` (``distill_weight`` None: the method's default); None: the
    trainer's cross-entropy plus distillation. ``backbone_lr_scale``: the backbone's learning rate relative to the
    learned parts' in the method's recipe."""

    modules: Callable[[Policy, Block, TokenProgram], dict[str, nn.Module]]
    train_rewrite: BlockRewrite
    weights: Callable[[Policy], Any] = lambda policy: getattr(policy, "weights", None)
    translate: Callable[[dict, list[str]], dict[str, Any] | None] | None = None
    loss: Callable[..., Callable] | None = None
    backbone_lr_scale: float = 0.01


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method (see the module docstring).

    ``options`` maps extra command-line option names to policy fields (a field's own name always works).
    ``needs_class_token``: it reads the class token (AdaViT's decisions). ``scores_tokens``: it ranks tokens by
    attention, the class token's row or, in a model without one, the attention each token receives (the plan says
    which). ``needs_keys``: it reads the attention keys.
    ``reduces_tokens``: it changes the token rows (False: ClusTR, which changes the attention only).
    ``keeps_attention``: its rewritten block still attends with the model's own attention call, which a keep policy
    set by an earlier block can renormalise (False: ClusTR's clustered attention replaces it).
    ``pads_tokens``: images keep different numbers of rows, padded to a common length (size 0).
    ``adaptive``: what an image costs depends on the image (AdaViT's usage; implied by ``pads_tokens``), so MACs
    per image are counted one image at a time.
    ``carries_sizes``: its stream function is sized (``(tokens, sizes)``), which starts the sizes channel.
    ``proportional(policy)``: whether the sizes it carries weight later attention by ``log(size)``.
    ``merges_rows(policy)``: whether a row it leaves can stand for several patches (EViT's fused token, a ToMe
    merge); later position terms (rotary tables, relative bias) take such a row at the one position its positions
    rule gives (:func:`~fxprune.ops.follows`), which the plan notes.
    ``refuse(policy, block)``: why it cannot rewrite a block (beyond the plan's model-wide checks), or None.
    ``knob`` / ``settings(ctx)``: what ``fxprune bench`` benchmarks (a fitted knob, or fixed settings).
    ``learned``: its trained parts, for a method with a predictor.
    ``identity(layers)``: a setting at ``layers`` that changes nothing (keep rate 1, r = 0); ``example(layers)``:
    a setting at ``layers`` that reduces; both for the contract tests every method passes, and for the docs.
    """

    name: str
    policy: type[Policy]
    rewrite: BlockRewrite
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    needs_class_token: bool = False
    scores_tokens: bool = False
    needs_keys: bool = False
    reduces_tokens: bool = True
    keeps_attention: bool = True
    pads_tokens: bool = False
    adaptive: bool = False
    carries_sizes: bool = False
    proportional: Callable[[Policy], bool] | None = None
    merges_rows: Callable[[Policy], bool] | None = None
    refuse: Callable[[Policy, Block], str | None] | None = None
    knob: Knob | None = None
    settings: Callable[[SweepContext], list[Policy]] | None = None
    learned: Learned | None = None
    identity: Callable[[tuple[int, ...]], Policy] | None = None
    example: Callable[[tuple[int, ...]], Policy] | None = None


    @property
    def cost_per_image(self) -> bool:
        """Whether what an image costs depends on the image (``adaptive`` or ``pads_tokens``)."""
        return self.adaptive or self.pads_tokens

    @property
    def masks_in_training(self) -> bool:
        """Whether its training graph keeps every row and masks the dropped ones with a keep policy that every
        later attention reads (DynamicViT), instead of removing them."""
        return self.learned is not None and self.reduces_tokens

    @property
    def weights_later_keys(self) -> bool:
        """Whether it tells every later attention something per key row (sizes and padding, or a training keep
        policy), which a later attention over other keys than the stream's rows cannot take."""
        return self.carries_sizes or self.masks_in_training


_METHODS: dict[str, Method] = {}
_BY_POLICY: dict[type, Method] = {}


def register_method(name: str, policy: type[Policy], **spec: Any) -> Callable[[BlockRewrite], BlockRewrite]:
    """Register the decorated block rewrite as method ``name`` for policies of type ``policy`` (``spec``: the
    other :class:`Method` fields). Registering a name twice replaces the earlier method (reloading a module)."""
    if not (isinstance(policy, type) and issubclass(policy, Policy) and dataclasses.is_dataclass(policy)):
        raise PolicyError(f"register_method({name!r}): {policy!r} is not a Policy dataclass")

    def register(rewrite: BlockRewrite) -> BlockRewrite:
        method = Method(name, policy, rewrite, **spec)
        earlier = _METHODS.pop(name, None)
        if earlier is not None:
            _BY_POLICY.pop(earlier.policy, None)
        if policy in _BY_POLICY:
            raise PolicyError(f"{policy.__name__} is already registered as method {_BY_POLICY[policy].name!r}")
        _METHODS[name] = method
        _BY_POLICY[policy] = method
        return rewrite

    return register


def unregister_method(name: str) -> Method:
    """Remove method ``name`` from the registry (e.g. a method registered for one experiment); returns it."""
    method = get_method(name)
    del _METHODS[method.name]
    del _BY_POLICY[method.policy]
    return method


def methods() -> tuple[Method, ...]:
    """Every registered method, fxprune's own in the order of their modules' names, then users' in order."""
    return tuple(_METHODS.values())


def get_method(name: str) -> Method:
    """The method registered as ``name`` (case-insensitive); :class:`~fxprune.PolicyError` if none is."""
    method = _METHODS.get(name.strip().lower())
    if method is None:
        raise PolicyError(f"unknown policy {name!r}; known: {', '.join(_METHODS)}")
    return method


def method_of(policy: Policy | type[Policy]) -> Method:
    """The method of ``policy`` (an instance or a class)."""
    cls = policy if isinstance(policy, type) else type(policy)
    method = _BY_POLICY.get(cls)
    if method is None:
        raise PolicyError(
            f"{cls.__name__} is not a registered method: decorate its block rewrite with "
            "fxprune.methods.register_method"
        )
    return method
