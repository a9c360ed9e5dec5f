"""Faster generated code for a transformed model: its modules, parameters and buffers read from their owners'
dictionaries.

fx writes an attribute path as Python attribute reads (``getattr(self.blocks, "3").attn.qkv.weight``); each step
into a submodule or parameter is a call of ``nn.Module.__getattr__``, a Python function, five for that weight and
dozens per block. At batch 1 their cost is a measurable share of a small model's time. The code fxprune runs reads
the same path as ``self._modules['blocks']._modules['3']._modules['attn']._modules['qkv']._parameters['weight']``
wherever ``nn.Module``'s own lookup would find each step there: the same values, read at each call (a module or
parameter replaced later is what the next call uses; one no longer there, as after ``quantize_dynamic`` swapped its
module, is named by :func:`refuse_moved`). ``gm.code`` keeps fx's form. :class:`DirectGraphModule` runs
such code after every ``recompile``, and so also as a copy (``copy.deepcopy``) and after ``torch.save`` and
``torch.load``.

Traced by ``torch.fx`` (``torch.fx.symbolic_trace``, any ``fx.Tracer``), the forward records its graph's nodes as
they are instead (:func:`fx_traceable`): fxprune's functions as single calls, which a tracer would otherwise run on
its proxies and stop at their data-dependent branches.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch import nn
from torch.fx.graph import PythonCode, _format_target
from torch.fx.graph_module import (
    _USER_PRESERVED_ATTRIBUTES_KEY,
    _deserialize_graph_module,
    _format_import_block,
    _forward_from_src,
)
from torch.package import sys_importer

from ..errors import UnsupportedModelError, qualified_name
from .arguments import TakesCapturedArguments

__all__ = [
    "direct_path", "direct_forward", "refuse_moved", "fx_traceable", "pickled_code", "DirectGraphModule",
    "keep_attribute", "traceable_forward", "node_records", "put_back_records",
]


_MODULE_LOOKUPS = (nn.Module.__getattr__, TakesCapturedArguments.__getattr__)


def _store_of(owner: object, name: str) -> str | None:
    """The dictionary of ``owner`` (``_parameters``, ``_buffers`` or ``_modules``) that ``owner.<name>`` reads where
    ``nn.Module.__getattr__`` finds it (no instance or class attribute of that name, and ``nn.Module``'s own
    ``__getattr__`` or :class:`~fxprune.capture.arguments.TakesCapturedArguments`', which finds the same); None where
    something else would."""
    if not isinstance(owner, nn.Module) or type(owner).__getattr__ not in _MODULE_LOOKUPS \
            or name in owner.__dict__ or hasattr(type(owner), name):
        return None
    return next((store for store in ("_parameters", "_buffers", "_modules") if name in owner.__dict__[store]), None)


def direct_path(root: nn.Module, target: str) -> str:
    """``self.<target>`` (``root`` is ``self``) as an expression that reads each step from its owner's own
    dictionary where :func:`_store_of` says ``nn.Module`` would, the rest as attributes."""
    expression, owner, parts = "self", root, target.split(".")
    for position, part in enumerate(parts):
        store = _store_of(owner, part)
        if store is None:
            return _format_target(expression, ".".join(parts[position:]))
        expression, owner = f"{expression}.{store}[{part!r}]", owner.__dict__[store][part]
    return expression


def direct_forward(gm: fx.GraphModule, graph: fx.Graph, code: PythonCode) -> Callable[..., Any]:
    """The forward of ``code``, ``graph``'s Python code for ``gm``, with each module, parameter and buffer its nodes
    read (``get_attr``, ``call_module``) found by :func:`direct_path`; where a lookup fails as one of them is no
    longer where it was found, :func:`refuse_moved` says which."""
    targets = {node.target for node in graph.nodes if node.op in ("get_attr", "call_module")}
    paths = {target: direct_path(gm, target) for target in targets}
    paths = {target: path for target, path in paths.items() if path != _format_target("self", target)}
    source = code.src
    if not paths:
        return _forward_from_src(source, code.globals)
    direct = {_format_target("self", target): path for target, path in paths.items()}
    pattern = "|".join(re.escape(plain) for plain in sorted(direct, key=len, reverse=True))  # a longer path first
    source = re.sub(rf"(?<![\w.])(?:{pattern})(?![\w.])", lambda match: direct[match.group(0)], source)
    forward = _forward_from_src(source, code.globals)

    @functools.wraps(forward)
    def checked(self: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        try:
            return forward(self, *args, **kwargs)
        except KeyError:
            refuse_moved(self, paths)
            raise

    return checked


def refuse_moved(gm: nn.Module, paths: dict[str, str]) -> None:
    """Raise :class:`~fxprune.UnsupportedModelError` where a module, parameter or buffer ``gm``'s code reads at
    ``paths`` (target → :func:`direct_path` when the code was written) is no longer found there, as after a module
    of ``gm`` was swapped for another kind (``torch.ao.quantization.quantize_dynamic``) or a parameter parametrized
    (``torch.nn.utils.parametrize``): naming it and what its owner is now."""
    for target, path in sorted(paths.items()):
        if direct_path(gm, target) == path:
            continue
        *owner_path, name = target.split(".")
        try:
            owner = gm.get_submodule(".".join(owner_path))
        except AttributeError:
            now = f"{'.'.join(owner_path)} is no longer a module of it"
        else:
            now = f"{'.'.join(owner_path) or 'the model'} is now a {qualified_name(type(owner))} whose {name} is not"
        kind = re.search(r"\._(parameter|buffer|module)s\[[^]]*\]$", path)
        raise UnsupportedModelError(
            f"the transformed model reads {target} as the {kind.group(1) if kind else 'attribute'} it was when it "
            f"was transformed, and {now} (a module swapped or a parameter parametrized after the transform, as "
            "quantize_dynamic and torch.nn.utils.parametrize do): make such changes before fxprune.transform, or "
            "transform again after them (a method that slices a layer's weights, as AdaViT's skipping graph does, "
            "needs it float: quantize its static form, skip=False)"
        )


def _proxies_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[fx.Proxy]:
    return [value for value in (*args, *kwargs.values()) if isinstance(value, fx.Proxy)]


def _recorded(gm: fx.GraphModule, graph: fx.Graph, tracer: fx.Tracer, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
    """The output of ``graph`` (``gm``'s) on ``args`` and ``kwargs``, some of them proxies of ``tracer``, with each
    node recorded by ``tracer`` as it is: a call, an attribute read (at ``gm``'s path in the module the tracer traces,
    which ``gm`` may be part of), a module call through the tracer's own ``call_module`` (which decides whether to
    trace into it)."""
    path = tracer.path_of_module(gm)
    values: dict[fx.Node, Any] = {}
    for position, node in enumerate(graph.find_nodes(op="placeholder")):
        values[node] = args[position] if position < len(args) else kwargs.get(
            node.target, node.args[0] if node.args else None)
    for node in graph.nodes:
        if node.op == "placeholder":
            continue
        node_args, node_kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
        if node.op == "output":
            return node_args[0]
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            values[node] = tracer.call_module(module, module.forward, node_args, node_kwargs)
        elif node.op == "get_attr":
            values[node] = tracer.create_proxy("get_attr", f"{path}.{node.target}" if path else node.target, (), {})
        else:
            values[node] = tracer.create_proxy(node.op, node.target, node_args, node_kwargs, name=node.name)
    raise AssertionError("a graph without an output")


def fx_traceable(forward: Callable[..., Any], signature_of: Callable[..., Any],
                 graph_of: Callable[[fx.GraphModule], fx.Graph]) -> Callable[..., Any]:
    """``forward`` (a module's, taking ``self``), which records the nodes of ``graph_of(self)`` as they are when a
    ``torch.fx`` tracer calls it with its proxies (:func:`_recorded`); ``signature_of``'s signature, which a tracer
    reads to make its placeholders."""

    @functools.wraps(signature_of)
    def traceable(self: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        proxies = _proxies_in(args, kwargs)
        if proxies:
            return _recorded(self, graph_of(self), proxies[0].tracer, args, kwargs)
        return forward(self, *args, **kwargs)

    return traceable


def pickled_code(graph: fx.Graph) -> tuple[str, str]:
    """``graph``'s code as fx pickles a ``GraphModule``'s: its Python source (``self`` the module) and the import
    block that source needs."""
    code = graph.python_code(root_module="self")
    return code.src, _format_import_block(code.globals, sys_importer)


def traceable_forward(module: nn.Module) -> Callable[..., Any]:
    """The forward to trace ``module`` with: for a graph that runs the code :func:`direct_forward` writes (its class
    says ``runs_direct_code``), fx's own code of the graph it runs in its mode (``train_graph`` in training mode,
    where it has one), whose attribute reads a tracer sees (the direct code reads parameters past it); else its
    class's forward."""
    if not getattr(type(module), "runs_direct_code", False):
        return type(module).forward
    graph = module.train_graph if module.training and hasattr(module, "train_graph") else module.graph
    code = graph.python_code(root_module="self")
    return _forward_from_src(code.src, code.globals)


def keep_attribute(gm: fx.GraphModule, name: str, value: object) -> None:
    """Set attribute ``name`` of ``gm`` to ``value``, kept by ``copy.deepcopy`` (``GraphModule`` copies only what its
    meta names) and ``torch.save``."""
    setattr(gm, name, value)
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[name] = value


class DirectGraphModule(TakesCapturedArguments, fx.GraphModule):
    """A ``GraphModule`` whose forward is :func:`direct_forward` of its graph: generated again at each
    ``recompile``, kept by ``copy.deepcopy`` and rebuilt by ``torch.load`` (pickled as fx pickles a ``GraphModule``,
    its code; loaded as this class). Its call also takes the model's other arguments at their captured values
    (:class:`~fxprune.capture.arguments.TakesCapturedArguments`)."""

    runs_direct_code = True  # traced again through fx's own code (traceable_forward)

    def recompile(self) -> PythonCode:
        code = super().recompile()
        forward = direct_forward(self, self.graph, code)
        type(self).forward = fx_traceable(forward, forward, lambda gm: gm.graph)
        return code

    def _deepcopy_init(self) -> Callable[[fx.GraphModule, nn.Module, fx.Graph], None]:
        """How ``copy.deepcopy`` initialises the copy: as ``GraphModule`` does, keeping the class name."""
        return functools.partial(fx.GraphModule.__init__, class_name=type(self).__name__)

    def __reduce__(self) -> tuple[Any, ...]:
        source, import_block = pickled_code(self.graph)
        body = {key: value for key, value in self.__dict__.items() if key != "_graph"}
        return _load_direct, ({**body, "_code": source, "_graphmodule_cls_name": type(self).__name__,
                               _RECORDS: node_records(self.graph)}, import_block)


def _load_direct(body: dict[str, Any], import_block: str) -> DirectGraphModule:
    """The :class:`DirectGraphModule` pickled as ``body`` (its attributes but the graph) and its code's
    ``import_block``: the graph traced again from that code, as ``torch.load`` rebuilds a ``GraphModule``, with its
    nodes' records and its meta where the records fit that graph (:func:`put_back_records`), else with the names of
    the attributes a copy keeps (:func:`keep_attribute`) alone: the rest of its meta describes the graph it had."""
    forward = _forward_from_src(import_block + body["_code"], {})
    gm = _deserialize_graph_module(forward, body, DirectGraphModule)
    meta = body.get("meta", {})
    if put_back_records(gm.graph, gm.__dict__.pop(_RECORDS, None)):
        gm.meta.update(meta)
    elif _USER_PRESERVED_ATTRIBUTES_KEY in meta:
        gm.meta[_USER_PRESERVED_ATTRIBUTES_KEY] = meta[_USER_PRESERVED_ATTRIBUTES_KEY]
    return gm


_RECORDS = "_fxprune_nodes"  # the key of the node records in a pickled DirectGraphModule
_RECORDED = ("fxprune", "nn_module_stack")  # what the analysis and a later transform read of a node, besides values


def _target_name(target: Any) -> str:
    """A node target as text: its name, or a function's qualified name."""
    if isinstance(target, str):
        return target
    return f"{getattr(target, '__module__', None)}.{getattr(target, '__qualname__', repr(target))}"


def node_records(graph: fx.Graph) -> list[tuple[str, str, dict[str, Any]]]:
    """Each node of ``graph``, in order: its op, its target (:func:`_target_name`) and its meta :data:`_RECORDED`
    (an inserted node's tag, the module calls it was traced in: each module's class by name, as a class made inside
    a function cannot be pickled)."""
    def recorded(node: fx.Node) -> dict[str, Any]:
        meta = {key: node.meta[key] for key in _RECORDED if key in node.meta}
        if "nn_module_stack" in meta:
            meta["nn_module_stack"] = {call: (path, _target_name(cls)) for call, (path, cls) in
                                       meta["nn_module_stack"].items()}
        return meta

    return [(node.op, _target_name(node.target), recorded(node)) for node in graph.nodes]


def put_back_records(graph: fx.Graph, records: list[tuple[str, str, dict[str, Any]]] | None) -> bool:
    """Give the nodes of ``graph``, traced again from the code of the graph ``records`` were taken from
    (:func:`node_records`), their meta back: the other nodes one for one, in order, the attribute reads by their
    target (tracing makes them where they are first read); False (nothing changed) where there are no records or
    the nodes are not the same ops on the same targets."""
    if records is None:
        return False
    nodes = [node for node in graph.nodes if node.op != "get_attr"]
    taken = [record for record in records if record[0] != "get_attr"]
    reads = {target: meta for op, target, meta in records if op == "get_attr"}
    if len(nodes) != len(taken) or {node.target for node in graph.nodes if node.op == "get_attr"} != set(reads) \
            or any((node.op, _target_name(node.target)) != record[:2] for node, record in zip(nodes, taken)):
        return False
    for node, (_, _, meta) in zip(nodes, taken):
        node.meta.update(meta)
    for node in graph.find_nodes(op="get_attr"):
        node.meta.update(reads[node.target])
    return True
