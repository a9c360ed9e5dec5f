"""Example values on fake tensors: the fake-tensor mode and weights, and propagation of example values
through a captured graph (``node.meta['val']`` and ``node.meta['macs']``) after capture or a rewrite."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

from ..counting import MacCounter
from ..ops.registry import op_of

F = TypeVar("F", bound=Callable[..., Any])


class _QuietFakeTensorMode(FakeTensorMode):
    """A fake-tensor mode that keeps torch from logging the traceback of an op that fails in it: the error is
    raised all the same, and fxprune turns it into its own (a rewrite that fails verification is refused with a
    reason, without a page of torch's traceback on the user's terminal first). While it is entered,
    ``torch.compiler.is_compiling()`` is True, as when torch.compile or torch.export trace a model: the model's
    own code runs in it (modules kept whole) and every tensor it makes is fake, so code that caches tensors
    unless it is being compiled (Hugging Face's ``compile_compatible_method_lru_cache``, BEiT's relative position
    index) must not keep one, which every later call of the user's model would get."""

    def __enter__(self) -> Any:
        _quiet(+1)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        try:
            return super().__exit__(*exc)
        finally:
            _quiet(-1)


_FAKE_LOG = logging.getLogger("torch._subclasses.fake_tensor")
_entered = [0]  # quiet modes entered and not left (they nest)


def _drop(record: logging.LogRecord) -> bool:
    return False


_compiling = [False]  # torch.compiler's flag before the outermost quiet mode was entered


def _quiet(step: int) -> None:
    """Count a quiet mode entered (+1) or left (−1); while any is entered, torch's fake-tensor log is silent and
    ``torch.compiler.is_compiling()`` is True."""
    _entered[0] += step
    if _entered[0] == 1 and step > 0:
        _FAKE_LOG.addFilter(_drop)
        _compiling[0], torch.compiler._is_compiling_flag = torch.compiler._is_compiling_flag, True
    elif _entered[0] == 0:
        _FAKE_LOG.removeFilter(_drop)
        torch.compiler._is_compiling_flag = _compiling[0]


class _Fakes(threading.local):
    """This thread's fake-tensor mode and the fakes of the real tensors it has seen (weights, inputs)."""

    def __init__(self) -> None:
        self.mode = _QuietFakeTensorMode(allow_non_fake_inputs=True)
        self.of: WeakIdKeyDictionary = WeakIdKeyDictionary()


_FAKES = _Fakes()

_LOCK = threading.RLock()


def one_at_a_time(fn: F) -> F:
    """``fn``, run by one thread at a time in the process (others wait): torch.fx tracing patches process-wide state,
    as does the quiet fake-tensor mode (torch's log filter and compiling flag), so captures, propagations and
    rewrites do not overlap."""

    @functools.wraps(fn)
    def alone(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return fn(*args, **kwargs)

    return alone  # type: ignore[return-value]


def fake_mode() -> FakeTensorMode:
    """The fake-tensor mode of fxprune's example values (static shapes, real tensors accepted as constants; an op
    that fails in it raises without torch logging its traceback): one per thread, so that every example value is
    of the same mode and each weight is made fake once (:func:`fake_tensor`)."""
    return _FAKES.mode


def _layout(t: torch.Tensor) -> tuple:
    return t.dtype, t.shape, t.stride(), t.device, t.requires_grad


def fake_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t``'s fake tensor in :func:`fake_mode`, made once while ``t`` lives and keeps its layout (dtype, shape,
    strides, device, ``requires_grad``); a tensor changed in place since (``module.double()`` replaces each
    parameter's data) gets a new one. The fake of an inference tensor (made under ``torch.inference_mode()``) is a
    normal one, as fxprune computes example values outside that mode."""
    fake = _FAKES.of.get(t)
    if fake is None or _layout(fake) != _layout(t):
        fake = None if t.is_inference() else _FAKES.mode.from_tensor(t)
        if fake is None or _layout(fake) != _layout(t):  # the mode's own memo may hold t as it was
            fake = _empty_like(t)
        _FAKES.of[t] = fake
    return fake


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """A new fake tensor of ``t``'s layout, outside inference mode."""
    with torch.inference_mode(False), _FAKES.mode:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device, requires_grad=t.requires_grad)


def _tensors_of(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``module``'s parameters and buffers, by name."""
    return [*module.named_parameters(), *module.named_buffers()]


@contextlib.contextmanager
def fake_weights(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s parameters and buffers are their fake tensors (:func:`fake_tensor`).

    Ops on fake weights hit the fake-tensor dispatch cache; ops mixing in real weights convert them on
    every call, several times slower.
    """
    state = {name: fake_tensor(t) for name, t in _tensors_of(module)}
    with _reparametrize_module(module, state):
        yield


@contextlib.contextmanager
def fakes_not_kept(module: nn.Module) -> Iterator[None]:
    """Within the block, code run on fake tensors may set tensor attributes of ``module``'s modules (the hook of
    ``torch.nn.utils.prune`` sets its module's ``weight`` at each call): on leaving it, each attribute that holds a
    fake tensor is put back as it was, or removed where there was none, so that no module keeps a fake tensor."""
    before = {(id(owner), name): value for owner in module.modules() for name, value in vars(owner).items()
              if isinstance(value, torch.Tensor)}
    try:
        yield
    finally:
        for owner in module.modules():
            for name, value in list(vars(owner).items()):
                if isinstance(value, FakeTensor):
                    kept = before.get((id(owner), name))
                    if kept is None:
                        del owner.__dict__[name]
                    else:
                        owner.__dict__[name] = kept


def _stand_in(value: Any, generator: torch.Generator) -> Any:
    """A real tensor of the fake tensor ``value``'s shape, dtype and device: random normal values where it holds
    floating-point numbers, zeros otherwise (any index is then in range); anything else as it is."""
    if not isinstance(value, FakeTensor):
        return value
    if value.dtype.is_floating_point or value.dtype.is_complex:
        return torch.randn(value.shape, dtype=value.dtype, generator=generator).to(value.device)
    return torch.zeros(value.shape, dtype=value.dtype, device=value.device)


def on_stand_ins(module: nn.Module, args: tuple, kwargs: dict, weights: Mapping[str, torch.Tensor] | None = None,
                 seed: int = 0) -> Any:
    """The example value of a call of ``module``, a module the graph calls whole, whose code does not run on fake
    tensors (it branches on tensor data, or is TorchScript): ``module(*args, **kwargs)`` run for real on stand-ins
    of the fake tensors among the arguments (:func:`_stand_in`, drawn from ``seed``), with its parameters and
    buffers ``weights`` (by name; None: its own), without gradients and keeping the global random state; its tensors
    as fake tensors. Its shapes are those the code gives for the stand-ins: the right ones unless they depend on the
    values (:func:`shapes_from_values` tells)."""
    generator = torch.Generator().manual_seed(seed)
    with unset_fake_temporarily(), torch.random.fork_rng(devices=[]), torch.no_grad(), contextlib.ExitStack() as stack:
        if weights is not None:
            stack.enter_context(_reparametrize_module(module, dict(weights)))
        real_args, real_kwargs = pytree.tree_map(lambda value: _stand_in(value, generator), (args, kwargs))
        value = module(*real_args, **real_kwargs)
    return pytree.tree_map_only(torch.Tensor, fake_tensor, value)


def _shapes(value: Any) -> list[tuple[int, ...]]:
    return [tuple(leaf.shape) for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def shapes_from_values(module: nn.Module, args: tuple, kwargs: dict, value: Any) -> bool:
    """Whether the shapes of ``value``, :func:`on_stand_ins` of ``module`` on ``args`` and ``kwargs``, depend on the
    values of its inputs: other stand-ins give other shapes (where the module fails on them, nothing is said)."""
    try:
        other = on_stand_ins(module, args, kwargs, seed=1)
    except Exception:  # noqa: BLE001 - the module's own error on other values; its example value stands
        return False
    return _shapes(value) != _shapes(other)


# --------------------------------------------------------------------------------------------------
# Example values after capture


class _ValueInterpreter(fx.Interpreter):
    """Example values of each node (``values``) and, with ``count``, the MACs each computes (``macs``). ``weights``:
    the real parameters and buffers of ``gm`` by name, for a module it calls whose code does not run on fake
    tensors (:func:`on_stand_ins`; None: such a call fails)."""

    def __init__(self, gm: fx.GraphModule, count: bool = True, weights: Mapping[str, torch.Tensor] | None = None):
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[fx.Node, Any] = {}
        self.macs: dict[fx.Node, int] = {}
        self.count = count
        self.weights = weights

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(target, args, kwargs)
        except Exception:
            if self.weights is None:
                raise
            prefix = f"{target}."
            own = {name[len(prefix):]: t for name, t in self.weights.items() if name.startswith(prefix)}
            return on_stand_ins(self.fetch_attr(target), args, kwargs, own)

    def run_node(self, n: fx.Node) -> Any:
        counter = MacCounter() if self.count else contextlib.nullcontext()
        declared = op_of(n.target) if n.op == "call_function" else None
        try:
            with counter:
                if declared is not None and declared.worst_case is not None:
                    args, kwargs = self.fetch_args_kwargs_from_env(n)
                    value = declared.worst_case(*args, **kwargs)
                else:
                    value = super().run_node(n)
        except Exception as err:
            raise ValuePropagationError(n, err) from err
        self.values[n] = value
        if self.count:
            self.macs[n] = counter.total
        return value


def worst_case_run(gm: fx.GraphModule, *args: Any) -> Any:
    """``gm(*args)`` with each graph op that declares a worst case giving it (:func:`~fxprune.ops.graph_op`): how a
    graph op that calls a graph of its own gives an example value."""
    return _ValueInterpreter(gm).run(*args)


class ValuePropagationError(RuntimeError):
    """A node failed while computing example values; ``node`` names it."""

    def __init__(self, node: fx.Node, err: Exception):
        super().__init__(f"{node.format_node()}: {type(err).__name__}: {_first_line(err)}")
        self.node = node
        self.error = err


def example_inputs_like(gm: fx.GraphModule, batch_size: int | None = None) -> list[torch.Tensor]:
    """Fake inputs shaped like the captured example inputs, optionally with another batch size."""
    mode = fake_mode()
    inputs = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta["val"]
        shape = list(val.shape)
        if batch_size is not None:
            shape[0] = batch_size
        with mode:
            inputs.append(torch.empty(shape, dtype=val.dtype, device=val.device))
    return inputs


@one_at_a_time
@torch.inference_mode(False)  # as the capture
def propagate(gm: fx.GraphModule, batch_size: int | None = None, store: bool = True) -> dict[fx.Node, Any]:
    """Example values of every node of ``gm`` on fake inputs like the captured ones (no real compute; an op whose
    shapes depend on the data gives its worst case, :func:`~fxprune.ops.graph_op`).

    With ``store`` the values replace ``node.meta['val']`` and each node's MACs ``node.meta['macs']``.
    Raises :class:`ValuePropagationError` naming the first node that fails (e.g. a shape mismatch
    after a rewrite).
    """
    inputs = example_inputs_like(gm, batch_size)
    interp = _ValueInterpreter(gm, count=store, weights=dict(_tensors_of(gm)))
    mode = fake_mode()
    with fakes_not_kept(gm), fake_weights(gm), mode, torch.no_grad():
        interp.run(*inputs)
    if store:
        for node, value in interp.values.items():
            node.meta["val"] = value
            node.meta["macs"] = interp.macs[node]
    return interp.values


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:160] if text else ""
