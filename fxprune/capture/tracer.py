"""Building the ``GraphModule``: the value-propagating ``torch.fx`` tracer, the guards and notes it records
(:class:`TraceInfo`), example-input guessing, and :func:`trace`, the entry point of capture."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx._symbolic_trace import _create_wrapped_func
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
from torch.utils import _pytree as pytree

from ..counting import MacCounter
from ..errors import TraceError
from .arguments import ARGUMENTS, captured_arguments
from .asserts import PROXY, complete_assert_messages
from .codegen import DirectGraphModule, keep_attribute, traceable_forward
from .einsum import canonicalise_einsum
from .layout import batch_first_tokens
from .mha import decompose_multihead_attention
from .values import (
    _first_line,
    fake_mode,
    fake_tensor,
    fake_weights,
    fakes_not_kept,
    on_stand_ins,
    one_at_a_time,
    propagate,
    shapes_from_values,
)

ExampleInputs = Sequence[torch.Tensor] | torch.Tensor | Mapping[str, Any] | None
"""A model's example inputs: one tensor, a sequence of its first positional arguments, or its arguments by name."""

_MISSING = object()
_TRACED_THROUGH = (nn.TransformerEncoder, nn.TransformerEncoderLayer)  # torch.nn modules that hold attention
_MAX_LEAF_RETRIES = 32


@dataclasses.dataclass(frozen=True)
class Guard:
    """A Python condition (``value`` a bool) or number (an int or float: a size made a Python number) resolved
    during capture with the example inputs' shapes and dtypes."""

    node: str
    value: Any
    where: str

    def resolved(self, when: str) -> str:
        """What capture resolved, ``when`` (e.g. "at capture"): the model's code, the kind of guard and its value."""
        kind = "took a branch on a shape" if isinstance(self.value, bool) else "made a size a Python number"
        return f"the model's code at {self.where} {kind} {when} ({self.node} was {self.value})"


@dataclasses.dataclass
class TraceInfo:
    """What capture did besides plain tracing: leaves it had to add, guards, decompositions."""

    model_class: str
    example_shapes: list[tuple[int, ...]]
    input_names: list[str] = dataclasses.field(default_factory=list)
    example_dtypes: list[torch.dtype] = dataclasses.field(default_factory=list)
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)  # arguments given a value for the capture
    leaves: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    guards: list[Guard] = dataclasses.field(default_factory=list)
    decomposed: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    prefix_tokens_attr: int | None = None
    class_token_attr: bool | None = None
    failed_value: str | None = None  # the first op whose example value could not be computed, and why

    def __str__(self) -> str:
        inputs = ", ".join(f"{name} {list(shape)}" for name, shape in zip(self.input_names, self.example_shapes))
        lines = [f"captured {self.model_class} on inputs {inputs}"]
        if self.fixed:
            lines.append("  fixed for the capture: " + ", ".join(f"{k}={v!r}" for k, v in self.fixed.items()))
        for name, why in self.leaves:
            lines.append(f"  kept as a leaf: {name} ({why})")
        for name in self.decomposed:
            lines.append(f"  decomposed: {name} (nn.MultiheadAttention -> linear, SDPA, linear)")
        conditions = sum(isinstance(guard.value, bool) for guard in self.guards)
        if conditions:
            lines.append(f"  {conditions} condition(s) resolved from example shapes, re-checked after rewrites")
        if len(self.guards) > conditions:
            lines.append(f"  {len(self.guards) - conditions} size(s) made Python numbers from example shapes, "
                         "re-checked after rewrites")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _fxprune_trace(model: nn.Module) -> TraceInfo | None:
    """The capture record of a graph returned by fxprune, or None (any other module, or a graph module made
    elsewhere, which may have no ``meta`` at all: torchvision's feature extractors)."""
    return getattr(model, "meta", {}).get("fxprune_trace") if isinstance(model, fx.GraphModule) else None


def default_example_inputs(model: nn.Module, batch_size: int = 2) -> tuple[torch.Tensor]:
    """An image batch ``[batch_size, C, H, W]`` of the size ``model`` declares (timm, torchvision, HF), a batch of
    clips ``[batch_size, T, C, H, W]`` where it also declares a frame count (Hugging Face's video transformers:
    ViViT, VideoMAE, TimeSformer), or inputs of the shapes a graph returned by fxprune was captured with."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else "cpu"
    info = _fxprune_trace(model)
    if info is not None:
        return tuple(_example_like((batch_size, *shape[1:]), kind, dtype, device)
                     for shape, kind in zip(info.example_shapes, info.example_dtypes))
    size = _declared_image_size(model)
    chans = _declared_channels(model)
    if size is None:
        raise TraceError(
            f"cannot tell which input size {type(model).__name__} expects: pass example_inputs, "
            "e.g. fxprune.transform(model, policy, example_inputs=(torch.randn(2, 3, 224, 224),))"
        )
    frames = _declared_frames(model)
    clip = () if frames is None else (frames,)
    return (torch.randn(batch_size, *clip, chans, *size, dtype=dtype, device=device),)


def _example_like(shape: tuple[int, ...], kind: torch.dtype, dtype: torch.dtype, device: torch.device | str
                  ) -> torch.Tensor:
    """An example input of ``shape`` on ``device`` for one captured with dtype ``kind``: normal samples in ``dtype``
    (the model's) for a floating one, zeros of ``kind`` for an integer or boolean one (labels, masks)."""
    if kind.is_floating_point:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=kind, device=device)


def _as_hw(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    if isinstance(value, (tuple, list)) and len(value) == 3 and all(isinstance(v, int) for v in value):
        return (int(value[1]), int(value[2]))
    return None


def _declared_image_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size ``model`` declares: timm's ``patch_embed.img_size`` (also of a model it wraps, as timm's
    ``features_only`` wrapper does) or ``pretrained_cfg``, an ``image_size`` attribute, or a Hugging Face config's
    ``image_size`` (or its ``vision_config``'s, for a model built on a vision-language config such as SigLIP's
    classifier; or its ``backbone_config``'s, for a dense predictor such as Depth Anything; or V-JEPA 2's
    ``crop_size``)."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    config = getattr(model, "config", None)
    embedding = next((m.patch_embed for m in model.modules() if isinstance(getattr(m, "patch_embed", None), nn.Module)),
                     None)  # the model's own, or that of a model it wraps (timm's features_only)
    candidates = [
        getattr(embedding, "img_size", None),
        getattr(model, "image_size", None),
        getattr(model, "img_size", None),
        getattr(config, "image_size", None),
        getattr(getattr(config, "vision_config", None), "image_size", None),
        getattr(getattr(config, "backbone_config", None), "image_size", None),
        getattr(config, "crop_size", None),
        pretrained_cfg.get("input_size") if isinstance(pretrained_cfg, dict) else None,
    ]
    for value in candidates:
        hw = _as_hw(value)
        if hw is not None:
            return hw
    return None


def _declared_frames(model: nn.Module) -> int | None:
    """The frames per clip a Hugging Face video model's config declares (``num_frames``; V-JEPA 2's
    ``frames_per_clip``), or None."""
    config = getattr(model, "config", None)
    frames = getattr(config, "num_frames", getattr(config, "frames_per_clip", None))
    return frames if isinstance(frames, int) else None


def _declared_channels(model: nn.Module) -> int:
    """The input channels ``model`` declares: a Hugging Face config's ``num_channels`` (V-JEPA 2's ``in_chans``),
    else its first convolution's (a 3-D one embeds a video's tubelets), else 3."""
    config = getattr(model, "config", None)
    channels = getattr(config, "num_channels", getattr(config, "in_chans", None))
    if isinstance(channels, int):
        return channels
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            return module.in_channels
    return 3


# --------------------------------------------------------------------------------------------------
# The tracer


class _KnowsItsValue:
    """What a proxy that knows its example value does: ``len()`` of a shape or a tuple (``[*x.shape, heads]``,
    ``map`` over ``x.chunk(3)``), and ``int()`` or ``float()`` of a size (an interpolation's output size, a grid
    side), which takes its example value as a guard."""

    def __len__(self) -> int:
        val = self.node.meta.get("val", _MISSING)
        if isinstance(val, (tuple, list, torch.Size)):
            return len(val)
        raise TraceError(f"len() of {self.node.name} depends on data or the batch size and cannot be traced")

    def __int__(self) -> int:
        return self.tracer.to_number(self, int)

    def __float__(self) -> float:
        return self.tracer.to_number(self, float)


class _ValueProxy(_KnowsItsValue, fx.Proxy):
    """A proxy that knows its example value (:class:`_KnowsItsValue`), as do the attributes read from it
    (``x.shape``)."""

    def __getattr__(self, name: str) -> _ValueAttribute:
        return _ValueAttribute(self, name)

    def __repr__(self) -> str:  # what a size formatted into a string (an input check's message) shows
        text = super().__repr__()
        self.tracer.formatted[text] = self.node
        return text


class _ValueAttribute(_KnowsItsValue, fx.proxy.Attribute):
    """An attribute read from a :class:`_ValueProxy` (made a node when used), which knows its example value."""


class _Tracer(fx.Tracer):
    """``fx.Tracer`` that rebuilds dict-like dataclasses (Hugging Face ``ModelOutput``) instead of flattening them."""

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, dict) and dataclasses.is_dataclass(a) and not isinstance(a, type):
            kwargs = {f.name: self.create_arg(getattr(a, f.name)) for f in dataclasses.fields(a)}
            return self.create_node("call_function", type(a), (), kwargs)
        return super().create_arg(a)


class ReloadTracer(_Tracer):
    """Tracer ``torch.load`` uses to rebuild a saved fxprune graph: fxprune ops and timm's untraceable
    functions stay single calls."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=_registries()[1])


class _ValueTracer(_Tracer):
    """``fx.Tracer`` that propagates fake example values and resolves shape/dtype control flow."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: set[str], autowrap: tuple[Callable, ...]):
        super().__init__(autowrap_functions=autowrap, param_shapes_constant=False)
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.fake = fake_mode()
        self.macs = MacCounter()
        self.guards: list[Guard] = []
        self.example_args: dict[str, Any] = {}
        self._evaluating = False
        self._scope: list[str] = []
        self.failed_scope: list[str] | None = None
        self.failed_value: str | None = None
        self.formatted: dict[str, fx.Node] = {}  # the text of each proxy formatted into a string, and its node
        self.sized_by_values: list[str] = []  # the leaves run on stand-ins whose output shapes depend on the values

    # -- leaves and scopes
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or isinstance(m, (*self.leaf_types, torch.jit.ScriptModule)):
            return True
        if type(m) in _TRACED_THROUGH:
            return False
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if self._evaluating:
            return forward(*args, **kwargs)
        name = self.path_of_module(m)
        self._scope.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_scope is None:
                self.failed_scope = list(self._scope)
            raise
        finally:
            self._scope.pop()

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # -- example values
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self.macs.total = 0
        val = self._evaluate(kind, target, args, kwargs)
        if val is not _MISSING:
            proxy.node.meta["val"] = val
        proxy.node.meta["macs"] = self.macs.total
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self.example_args.get(target, _MISSING)
        try:
            a, kw = fx.node.map_aggregate((args, kwargs), _value_of)
        except LookupError:
            return _MISSING
        self._evaluating = True
        try:
            if kind == "get_attr":
                value = fetch_attr(self.root, target)
                return fake_tensor(value) if isinstance(value, torch.Tensor) else value
            with self.fake, self.macs:
                if kind == "call_function" and target is torch._assert:
                    return _checked(target, a, kw, self._scope, self.example_args, self.formatted)
                if kind == "call_function":
                    return target(*a, **kw)
                if kind == "call_method":
                    return getattr(a[0], target)(*a[1:], **kw)
                if kind == "call_module":
                    module = self.root.get_submodule(target)
                    try:
                        with fake_weights(module):
                            return module(*a, **kw)
                    except InputRejected:
                        raise
                    except Exception:  # noqa: BLE001 - code that cannot run on fake tensors runs on stand-ins
                        value = on_stand_ins(module, a, kw)
                        if shapes_from_values(module, a, kw, value):
                            self.sized_by_values.append(target)
                        return value
        except InputRejected:
            raise
        except Exception as err:
            if self.failed_value is None:
                where = self._scope[-1] if self._scope else "forward"
                self.failed_value = f"{getattr(target, '__name__', target)} in {where} ({type(err).__name__}: " \
                                    f"{_first_line(err)})"
            return _MISSING
        finally:
            self._evaluating = False
        return _MISSING

    # -- control flow
    def to_bool(self, obj: fx.Proxy) -> bool:
        return self._resolved(obj, bool, f"control flow depends on tensor data ({obj.node.name})")

    def to_number(self, obj: fx.Proxy, kind: type) -> Any:
        """``kind(obj)`` (int or float) from its example value, kept as a guard (re-checked after rewrites and at
        another batch size, since the graph holds the number from here on)."""
        return self._resolved(obj, kind, f"{kind.__name__}() of {obj.node.name} depends on tensor data and cannot be "
                                         "traced")

    def _resolved(self, obj: fx.Proxy, kind: type, error: str) -> Any:
        """``kind`` of ``obj``'s example value, recorded as a guard; a ``TraceError`` saying ``error`` when the value
        is unknown or a tensor (data)."""
        val = obj.node.meta.get("val", _MISSING)
        if val is _MISSING or isinstance(val, torch.Tensor):
            raise TraceError(error)
        self.guards.append(Guard(obj.node.name, kind(val), _user_frame()))
        return kind(val)

    def iter(self, obj: fx.Proxy):
        val = obj.node.meta.get("val", _MISSING)
        if isinstance(val, (tuple, list, torch.Size)):
            return iter([obj[i] for i in range(len(val))])
        return super().iter(obj)


class InputRejected(TraceError):
    """The model's own check of its input (``torch._assert``) fails on the example inputs."""


def _checked(
    check: Callable, args: tuple, kwargs: dict, scope: list[str], inputs: dict[str, Any],
    formatted: dict[str, fx.Node],
) -> Any:
    """The model's input check ``check(*args, **kwargs)`` on the example values; :class:`InputRejected` when it
    fails, naming the module (``scope``) and the example inputs' shapes (a size its message shows as a proxy,
    as code that formats a traced size does, is given its example value: ``formatted``, a proxy's text → its node)."""
    try:
        return check(*args, **kwargs)
    except AssertionError as err:
        def value(match: re.Match) -> str:
            node = formatted.get(match.group(0))
            return match.group(0) if node is None else str(node.meta.get("val", match.group(0)))

        message = PROXY.sub(value, str(err))
        where = next((name for name in reversed(scope) if name), "its forward")
        shapes = ", ".join(str(list(value.shape)) for value in inputs.values() if isinstance(value, torch.Tensor))
        raise InputRejected(
            f"the model rejects the example inputs {shapes} in {where}: {message.rstrip('.')}. Pass example_inputs "
            "of a shape it takes (fxprune.transform(model, policy, example_inputs=(x,)))"
        ) from err


def _value_of(arg: Any) -> Any:
    if isinstance(arg, fx.Proxy):
        arg = arg.node
    if isinstance(arg, fx.Node):
        if "val" not in arg.meta:
            raise LookupError(arg.name)
        return arg.meta["val"]
    return arg


def fetch_attr(root: nn.Module, target: str) -> Any:
    """``root``'s attribute at the dotted path ``target`` (``"blocks.0.attn.qkv.weight"``)."""
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _user_frame() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and "/fxprune/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} ({frame.line})"
    return "?"


_EINOPS_FUNCTIONS = ("rearrange", "repeat", "reduce", "einsum", "pack", "unpack")
_EINOPS_LAYERS = ("Rearrange", "Reduce", "EinMix")


def _einops() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """einops' functions and torch layers, where the model's code imported einops: kept as single calls, which
    compute their shapes from the tensors they get (traced, they would fix the example batch size)."""
    einops, layers = sys.modules.get("einops"), sys.modules.get("einops.layers.torch")
    functions = tuple(getattr(einops, name) for name in _EINOPS_FUNCTIONS if hasattr(einops, name)) if einops else ()
    modules = tuple(getattr(layers, name) for name in _EINOPS_LAYERS if hasattr(layers, name)) if layers else ()
    return modules, functions


def _registries() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """Leaf module types and functions kept as single calls: timm's registries, einops' (where imported) and
    fxprune's own ops."""
    from ..ops import graph_functions

    modules, functions = _einops()
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return modules, functions + graph_functions()
    return modules + tuple(get_notrace_modules()), functions + tuple(get_notrace_functions()) + graph_functions()


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """What a capture calls the model with: ``tensors``, its inputs, given as the arguments ``names`` (by keyword
    where ``by_keyword``, else positionally), and the arguments ``fixed`` for the capture (the others keep their
    defaults)."""

    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    fixed: dict[str, Any]
    by_keyword: bool = False

    def key(self) -> tuple:
        """What tells two captures' inputs apart: names, shapes, dtypes, devices and fixed arguments."""
        return (self.names, *((tuple(t.shape), t.dtype, t.device) for t in self.tensors), repr(self.fixed))


def _entry_class(cls: type, inputs: _Inputs, forward: Callable[..., Any]) -> type:
    """A subclass of ``cls`` whose ``forward`` takes exactly ``inputs.names`` and calls ``forward`` (``cls``'s, or
    what stands for it: :func:`~fxprune.capture.codegen.traceable_forward`) with them and ``inputs.fixed``; every
    other argument keeps its default."""
    params = ", ".join(inputs.names)
    passed = [f"{name}={name}" for name in inputs.names] if inputs.by_keyword else list(inputs.names)
    namespace: dict[str, Any] = {"_forward": forward, "_fixed": inputs.fixed}
    exec(f"def forward(self, {params}):\n    return _forward(self, {', '.join(passed)}, **_fixed)\n", namespace)
    return type(cls.__name__, (cls,), {"forward": namespace["forward"], "__module__": cls.__module__})


@contextlib.contextmanager
def _einops_kept_whole(model_globals: dict[str, Any] | None) -> Iterator[None]:
    """Within the block, fx keeps einops' functions as single calls where fx's own wrapping does not reach: in
    ``model_globals``, the globals of the model's own forward (fx wraps those of the submodules it calls), and in
    einops' namespace (code that calls ``einops.rearrange``)."""
    ids = {id(function) for function in _einops()[1]}
    einops = sys.modules.get("einops")
    namespaces = [namespace for namespace in (model_globals, vars(einops) if einops else None) if namespace]
    originals = [(namespace, {name: value for name, value in namespace.items() if id(value) in ids})
                 for namespace in namespaces]
    try:
        for namespace, functions in originals:
            namespace.update({name: _create_wrapped_func(function) for name, function in functions.items()})
        yield
    finally:
        for namespace, functions in originals:
            namespace.update(functions)


_SIZED_FACTORIES = ("zeros", "ones", "empty", "rand", "randn")  # torch functions that take sizes one by one


def _sizes_packed(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``factory`` (as ``torch.zeros``) that takes traced sizes one by one, ``factory(B, N, C)``, as it takes them
    in one tuple, ``factory((B, N, C))``, which fx records (torch's parser rejects the former); else as it is."""

    @functools.wraps(factory)
    def packed(*size: Any, **kwargs: Any) -> torch.Tensor:
        if len(size) > 1 and any(isinstance(value, fx.Proxy) for value in size):
            return factory(size, **kwargs)
        return factory(*size, **kwargs)

    return packed


def _dtype_resolved(info: type) -> Callable[..., Any]:
    """``info`` (``torch.finfo`` or ``torch.iinfo``) that also takes a traced dtype (``torch.finfo(x.dtype).max``):
    its example value, kept as a guard (a model cast to another dtype afterwards is refused, as for a branch on
    its dtype), else as it is."""

    @functools.wraps(info)
    def resolved(*args: Any) -> Any:
        if args and isinstance(args[0], fx.Proxy):
            dtype = args[0].node.meta.get("val", _MISSING)
            if not isinstance(dtype, torch.dtype) or not bool(args[0] == dtype):
                raise TraceError(f"{info.__name__}() of {args[0].node.name}, which is not a dtype, cannot be traced")
            return info(dtype)
        return info(*args)

    return resolved


@contextlib.contextmanager
def _torch_takes_traced_values() -> Iterator[None]:
    """Within the block, torch's factories that take sizes one by one (:data:`_SIZED_FACTORIES`) take sizes read
    from traced shapes too (:func:`_sizes_packed`): ``torch.zeros(B * heads, N, N)`` in a model's code; and
    ``torch.finfo``/``torch.iinfo`` take a traced dtype (:func:`_dtype_resolved`)."""
    originals = {name: getattr(torch, name) for name in (*_SIZED_FACTORIES, "finfo", "iinfo")}
    try:
        for name, function in originals.items():
            setattr(torch, name, _dtype_resolved(function) if name.endswith("info") else _sizes_packed(function))
        yield
    finally:
        for name, function in originals.items():
            setattr(torch, name, function)


def _positional_inputs(model: nn.Module, tensors: tuple[torch.Tensor, ...]) -> _Inputs:
    """``tensors`` as ``model``'s first positional arguments (``input_<i>`` past the ones its forward names)."""
    names = [p.name for p in inspect.signature(model.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][: len(tensors)]
    names += [f"input_{i}" for i in range(len(names), len(tensors))]
    return _Inputs(tuple(names), tensors, {})


def _named_inputs(model: nn.Module, arguments: Mapping[str, Any]) -> _Inputs:
    """``arguments`` of ``model``'s forward by name: the tensors its inputs, in that order, the other values fixed
    for the capture. Raises :class:`~fxprune.TraceError` for a name the forward does not take, no tensor, or a
    value that holds tensors (a list of them: it would be fixed)."""
    parameters = inspect.signature(model.forward).parameters
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for name in arguments:
        if not any_keyword and (name not in parameters or parameters[name].kind is parameters[name].POSITIONAL_ONLY):
            raise TraceError(
                f"{type(model).__name__}.forward takes no keyword argument {name!r} (it takes "
                f"{', '.join(parameters)}): name its arguments in example_inputs"
            )
    tensors = {name: value for name, value in arguments.items() if isinstance(value, torch.Tensor)}
    fixed = {name: value for name, value in arguments.items() if name not in tensors}
    for name, value in fixed.items():
        if any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value)):
            raise TraceError(
                f"example_inputs[{name!r}] holds tensors in a {type(value).__name__}: only a tensor is an input of "
                "the graph, and other values are fixed for the capture; give each tensor as an argument of its own"
            )
    if not tensors:
        raise TraceError(f"example_inputs {list(arguments)} hold no tensor: give {type(model).__name__} at least one")
    return _Inputs(tuple(tensors), tuple(tensors.values()), fixed, by_keyword=True)


def _graph_inputs(gm: fx.GraphModule, arguments: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
    """``arguments`` of a graph fxprune made, by name, in the order of its inputs. Raises
    :class:`~fxprune.TraceError` unless they are tensors for exactly its inputs."""
    names = [node.target for node in gm.graph.find_nodes(op="placeholder")]
    if sorted(arguments) != sorted(names) or not all(isinstance(v, torch.Tensor) for v in arguments.values()):
        raise TraceError(
            f"the graph fxprune made takes the inputs {', '.join(names)} (its other arguments were fixed when it was "
            f"captured): give a tensor for each, not {', '.join(arguments)}"
        )
    return tuple(arguments[name] for name in names)


# --------------------------------------------------------------------------------------------------
# Public entry point


@one_at_a_time
@torch.inference_mode(False)  # fake tensors and their MACs are made outside it
def trace(
    model: nn.Module,
    example_inputs: ExampleInputs = None,
    *,
    copy_weights: bool = False,
    training: bool | None = None,
) -> fx.GraphModule:
    """Capture ``model`` as a ``GraphModule`` with example values on every node.

    ``example_inputs``: the model's inputs (a tensor for its one input; a sequence, its first positional
    arguments), by default those of the size it declares, batch 2; or its arguments by name, a mapping: the tensors
    are the graph's inputs, in that order, and the other values are fixed for the capture (a Hugging Face model's
    ``{"pixel_values": x, "labels": y, "output_hidden_states": True}``: its graph takes ``pixel_values`` and
    ``labels``, positionally or by name, and returns the loss and the hidden states). Every argument not given
    keeps its default. ``model`` is never modified: its modules are deep-copied first, keeping the same parameter
    and buffer tensors (``copy_weights=True`` copies those too). ``training``: the mode whose code is captured (a
    branch on ``self.training`` keeps it), by default the model's. Returns a ``GraphModule`` with the original's
    module names, in the mode captured (a capture of fxprune's: its own graph, in the model's mode; its inputs by
    name are its own inputs'); ``gm.meta['fxprune_trace']`` is a :class:`TraceInfo`. Works within
    ``torch.inference_mode()`` as without it, and in threads (one capture at a time). Raises
    :class:`~fxprune.TraceError` when the model cannot be captured.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceError(
            f"the model is a TorchScript module ({type(model).__name__}, made by torch.jit.script or torch.jit.trace), "
            "whose Python code fxprune cannot read: pass the nn.Module it was made from; the transformed model is "
            "exported with fxprune.export"
        )
    if _compiled(model):
        raise TraceError(
            f"the model is {type(model._orig_mod).__name__} compiled by torch.compile, whose code fxprune cannot read: "
            "pass the module it compiles (model._orig_mod) and compile the transformed model (fxprune.lower)"
        )
    if isinstance(example_inputs, torch.Tensor):  # the model's one input
        example_inputs = (example_inputs,)
    elif example_inputs is None:
        example_inputs = default_example_inputs(model)
    if _fxprune_trace(model) is not None:
        named = isinstance(example_inputs, Mapping)
        return _recapture(model, _graph_inputs(model, example_inputs) if named else tuple(example_inputs), copy_weights)
    if isinstance(example_inputs, Mapping):
        inputs = _named_inputs(model, example_inputs)
    else:
        inputs = _positional_inputs(model, tuple(example_inputs))
    training = model.training if training is None else training
    if _STORES:
        return _copy_model(_stored_capture(_STORES[-1], model, inputs, training), copy_weights)
    return _capture(model, inputs, copy_weights, training)


def _compiled(model: nn.Module) -> bool:
    """Whether ``model`` is the wrapper ``torch.compile`` returns (only made once dynamo is imported)."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    return dynamo is not None and isinstance(model, dynamo.OptimizedModule)


# Captures made within the reusing_captures blocks entered and not left: (model, its inputs' and mode's key, capture)
_STORES: list[list[tuple[nn.Module, tuple, fx.GraphModule]]] = []


@contextlib.contextmanager
def reusing_captures() -> Iterator[None]:
    """Within the block, :func:`trace` captures a model once for each example-input layout (shapes, dtypes,
    devices) and train/eval mode, and hands out copies of that capture: each with its own modules and the model's
    parameters and buffers (``copy_weights=True``: copies of them), as a capture of its own would have.

    For work that rewrites one model many times (the setting search of ``fxprune bench``, the zoo): tracing is the
    largest part of a small model's :func:`~fxprune.transform`. Within the block the model must keep its modules
    and attributes; a parameter changed in place is seen (it is shared), one replaced is not. A block within a block
    shares the outer block's captures.
    """
    _STORES.append(_STORES[-1] if _STORES else [])
    try:
        yield
    finally:
        _STORES.pop()


def _stored_capture(
    store: list[tuple[nn.Module, tuple, fx.GraphModule]], model: nn.Module, inputs: _Inputs, training: bool
) -> fx.GraphModule:
    """The capture of ``model`` in mode ``training`` on inputs like ``inputs`` in ``store``, made and stored when
    missing."""
    key = (training, inputs.key())
    for owner, owner_key, gm in store:
        if owner is model and owner_key == key:
            return gm
    gm = _capture(model, inputs, copy_weights=False, training=training)
    store.append((model, key, gm))
    return gm


def _capture(model: nn.Module, inputs: _Inputs, copy_weights: bool, training: bool) -> fx.GraphModule:
    """:func:`trace` of a model that is not a capture of fxprune's, in mode ``training``."""
    root = _copy_model(model, copy_weights).train(training)
    info = TraceInfo(type(model).__name__, [tuple(t.shape) for t in inputs.tensors], list(inputs.names),
                     [t.dtype for t in inputs.tensors], inputs.fixed)
    info.prefix_tokens_attr = _int_attr(model, "num_prefix_tokens")
    info.class_token_attr = _class_token_attr(model)
    graph, tracer = _trace_with_leaf_retries(root, inputs, info)
    info.guards = tracer.guards
    info.failed_value = tracer.failed_value
    complete_assert_messages(graph, tracer.formatted)
    graph._tracer_cls = ReloadTracer  # torch.load re-traces the generated code with it, also a copy's (deepcopy)
    gm = DirectGraphModule(root, graph, class_name=type(root).__name__)
    for node in gm.graph.find_nodes(op="get_attr"):
        if "val" not in node.meta:  # tensor constants created by the tracer
            value = fetch_attr(gm, node.target)
            node.meta["val"] = fake_tensor(value) if isinstance(value, torch.Tensor) else value
    gm.meta["fxprune_trace"] = info
    keep_attribute(gm, ARGUMENTS, captured_arguments(model, inputs.names, inputs.fixed))
    decompose_multihead_attention(gm, info)
    batch_first_tokens(gm, info)
    canonicalise_einsum(gm)
    info.notes.extend(f"{name}, a leaf run on random stand-ins of its inputs, gives outputs whose shapes depend on "
                      "their values: the plan and any rewrite after it assume the shapes of that run, which other "
                      "inputs need not have" for name in dict.fromkeys(tracer.sized_by_values))
    info.notes.extend(_hook_notes(model, gm))
    info.notes.extend(f"the model does not read its input {node.target}: nothing it computes depends on it"
                      for node in gm.graph.find_nodes(op="placeholder") if not node.users)
    _restore_state(gm, root)
    gm.train(training)
    return gm


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _hook_notes(model: nn.Module, gm: fx.GraphModule) -> list[str]:
    """A note naming the modules of ``model`` with forward or backward hooks that ``gm``, its capture, does not call
    (its code was traced through, or the model itself): their hooks do not run in the graph."""
    called = {node.target for node in gm.graph.find_nodes(op="call_module")}
    hooked = [name or type(model).__name__ for name, module in model.named_modules()
              if name not in called and any(getattr(module, hooks, None) for hooks in _HOOKS)]
    if not hooked:
        return []
    return [f"the hooks of {', '.join(hooked)} do not run: the graph runs the code of these modules, not the modules "
            "(register hooks on the modules the graph calls, its leaves, or read values from the graph's nodes)"]


def _trace_with_leaf_retries(root: nn.Module, inputs: _Inputs, info: TraceInfo) -> tuple[fx.Graph, _ValueTracer]:
    """Trace ``root`` on ``inputs``; when a submodule's code fails, make it a leaf and retry.

    Each leaf added is recorded in ``info.leaves``. During tracing ``root``'s forward takes exactly one argument
    per input tensor (:func:`_entry_class`). Returns the graph and the tracer that made it (its guards and fake mode).
    Raises :class:`~fxprune.TraceError` when the failure is outside any submodule or after too many retries.
    """
    leaf_types, autowrap = _registries()
    leaf_names: set[str] = set()
    cls = type(root)
    root.__class__ = _entry_class(cls, inputs, traceable_forward(root))
    try:
        for _ in range(_MAX_LEAF_RETRIES):
            tracer = _ValueTracer(leaf_types, leaf_names, autowrap)
            tracer.example_args = {n: fake_tensor(t) for n, t in zip(inputs.names, inputs.tensors)}
            try:
                with _einops_kept_whole(getattr(cls.forward, "__globals__", None)), _torch_takes_traced_values(), \
                        fakes_not_kept(root):
                    graph = tracer.trace(root)
                break
            except InputRejected:
                raise
            except Exception as err:  # noqa: BLE001 - any failure inside user code leads to leafing
                scope = [s for s in (tracer.failed_scope or []) if s and s not in leaf_names]
                if not scope:
                    raise TraceError(
                        f"cannot trace {cls.__name__}: {type(err).__name__}: {err}. The failure is in the "
                        "model's own forward, outside any submodule; fxprune cannot make it a leaf. "
                        "Rewrite that control flow or pass a model whose forward is traceable."
                    ) from err
                leaf_names.add(scope[-1])
                info.leaves.append((scope[-1], f"{type(err).__name__}: {_first_line(err)}"))
        else:
            raise TraceError(f"cannot trace {cls.__name__}: gave up after {_MAX_LEAF_RETRIES} leaf retries")
    finally:
        root.__class__ = cls
    return graph, tracer


def _recapture(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...], copy_weights: bool) -> fx.GraphModule:
    """A copy of a graph fxprune made (module names, guards and tags kept), with fresh example values."""
    new = _copy_model(gm, copy_weights)
    new.__dict__.pop("fxprune_plan", None)
    new.meta.get(_USER_PRESERVED_ATTRIBUTES_KEY, {}).pop("fxprune_plan", None)
    for node, tensor in zip(new.graph.find_nodes(op="placeholder"), example_inputs):
        node.meta["val"] = fake_tensor(tensor)
    new.meta["fxprune_trace"] = dataclasses.replace(
        new.meta["fxprune_trace"], example_shapes=[tuple(t.shape) for t in example_inputs],
        example_dtypes=[t.dtype for t in example_inputs],
    )
    propagate(new)
    return new


def _int_attr(model: nn.Module, name: str) -> int | None:
    value = getattr(model, name, None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _class_token_attr(model: nn.Module) -> bool | None:
    value = getattr(model, "has_class_token", None)
    return value if isinstance(value, bool) else None


def _copy_model(model: nn.Module, copy_weights: bool) -> nn.Module:
    """A deep copy of ``model`` that shares its parameters and buffers (``copy_weights``: copies them) and the
    tensors its modules hold that autograd computed (``torch.nn.utils.prune``'s ``weight``, which a hook computes
    again at each call): those cannot be deep-copied."""
    memo: dict[int, Any] = {}
    if not copy_weights:
        for t in [*model.parameters(), *model.buffers()]:
            memo[id(t)] = t
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value
    return copy.deepcopy(model, memo)


def _restore_state(gm: fx.GraphModule, root: nn.Module) -> None:
    """Register parameters and buffers of ``root`` that the graph does not use, so state_dict keys match."""
    have = set(gm.state_dict().keys())
    for name, tensor in root.state_dict(keep_vars=True).items():
        if name in have:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = _ensure_module(gm, owner_name)
        if isinstance(tensor, nn.Parameter):
            owner.register_parameter(attr, tensor)
        else:
            owner.register_buffer(attr, tensor)


def _ensure_module(gm: nn.Module, path: str) -> nn.Module:
    module = gm
    for atom in filter(None, path.split(".")):
        if not hasattr(module, atom):
            module.add_module(atom, nn.Module())
        module = getattr(module, atom)
    return module
