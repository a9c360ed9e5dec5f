"""Learned passes: submodules a rewrite adds to the graph, a training graph beside the evaluation graph, trained
weights, and auxiliary values for losses.

* **Submodules** live under stable names, ``fxprune.<block path, dots as underscores>.<name>`` (e.g.
  ``fxprune.blocks_3.predictor``), so they travel in the transformed module's ``state_dict``. Those keys are the
  only ones the original model does not have: ``original.load_state_dict(sd, strict=False)`` skips them.
* **Two graphs.** fx bakes one branch of ``self.training`` into a graph, and a learned method needs two: for
  training (differentiable masks, static shapes) and for evaluation (tokens really removed). A
  :class:`TrainEvalGraphModule` holds both over the same parameters and submodules; ``.train()`` / ``.eval()``
  choose which one runs. Its ``graph`` and ``code`` are the evaluation graph's; ``train_graph`` is the other.
  An evaluation graph whose shapes depend on the data (AdaViT's skipping) runs eagerly under ``torch.compile``
  (``torch.compiler.disable``: one graph break where it is called): compiled, such a graph is cut at each of
  those ops into pieces that each cost more to enter than they save (slower than eager at batch 1 and 32 on the
  CPU, BENCHMARKS.md); the training graph, static, compiles.
* **Auxiliary values** (keep ratios, predictor scores) reach a training loop without changing the model's
  outputs: the training graph calls :func:`~fxprune.ops.emitting.emit`, which hands them to the innermost
  :func:`~fxprune.ops.emitting.collect` context.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.graph_module import _copy_attr, reduce_graph_module

from ..analysis import Block
from ..capture.arguments import TakesCapturedArguments
from ..capture.codegen import direct_forward, fx_traceable, node_records, pickled_code, put_back_records
from ..capture.tracer import fetch_attr
from ..errors import PolicyError
from ..ops.emitting import emit  # noqa: F401  (here before it moved: a model pickled then imports it from here)
from ..ops.registry import data_dependent
from ..policies import Compose, Policy
from .common import Role, attribute, insert_call, remove_dead_code
from .skipping import call_module, run_if_used

__all__ = [
    "LEARNED_PREFIX", "module_path_for", "add_modules", "insert_module", "TrainEvalGraphModule",
    "learned_state_dict", "save_weights", "read_weights", "key_mismatch", "load_weights", "drop_eval_identities",
]

LEARNED_PREFIX = "fxprune"  # the submodule every learned part lives under


def module_path_for(block: Block, name: str) -> str:
    """The stable name of ``block``'s learned submodule ``name``: ``fxprune.blocks_3.predictor``."""
    return f"{LEARNED_PREFIX}.{block.name.replace('.', '_')}.{name}"


def add_modules(gm: fx.GraphModule, block: Block, modules: dict[str, nn.Module]) -> None:
    """Register ``modules`` (name → module) as ``block``'s learned submodules of ``gm``."""
    for name, module in modules.items():
        gm.add_submodule(module_path_for(block, name), module)


def insert_module(
    gm: fx.GraphModule, after: fx.Node, block: Block, name: str, args: tuple, module: nn.Module | None = None
) -> fx.Node:
    """Insert a call of ``block``'s learned submodule ``name`` on ``args`` after ``after``. ``module`` is added under
    the stable name first; without it the submodule must be registered already (:func:`add_modules`, which the
    pipeline runs for a learned method so that its training and evaluation graphs share one module)."""
    path = module_path_for(block, name)
    if module is not None:
        gm.add_submodule(path, module)
    else:
        try:
            gm.get_submodule(path)
        except AttributeError:
            raise PolicyError(f"no learned submodule {path!r}: pass the module or register it first") from None
    return insert_call(gm, after, path, args, {}, block, name, Role.MODULE, op="call_module")


class TrainEvalGraphModule(TakesCapturedArguments, fx.GraphModule):
    """A ``GraphModule`` with a second graph, run in training mode, over the same parameters (see the module
    docstring). ``graph``/``code`` are the evaluation graph's; ``train_graph``/``train_code`` the training one's."""

    runs_direct_code = True  # traced again through fx's own code (capture.codegen.traceable_forward)

    def __init__(self, root: nn.Module, graph: fx.Graph, train_graph: fx.Graph, class_name: str = "GraphModule",
                 train_root: nn.Module | None = None):
        self.__dict__["_train_graph"] = train_graph
        self.__dict__["_incomplete"] = True  # the recompile fx's __init__ makes generates fx's code only
        super().__init__(root, graph, class_name)
        # what only the training graph reads: a layer the evaluation graph slices (``root`` has it), or a module only
        # training-mode code calls (``train_root`` has it)
        for node in train_graph.nodes:
            if node.op in ("get_attr", "call_module"):
                owner = root if train_root is None or _has_attr(root, node.target) else train_root
                _copy_attr(owner, self, node.target)
        del self.__dict__["_incomplete"]
        self.recompile()  # the training graph's own attributes are found directly only now

    @property
    def train_graph(self) -> fx.Graph:
        return self.__dict__["_train_graph"]

    @property
    def train_code(self) -> str:
        return self.train_graph.python_code(root_module="self").src

    def recompile(self):
        code = super().recompile()
        if "_incomplete" in self.__dict__:
            return code
        cls = type(self)
        evaluation = direct_forward(self, self.graph, code)
        if data_dependent(self.graph.nodes):  # shapes from the data: compiled in pieces, it ran slower than eager
            evaluation = torch.compiler.disable(evaluation)
        cls._eval_forward = evaluation
        cls._train_forward = direct_forward(self, self.train_graph, self.train_graph.python_code(root_module="self"))
        cls.forward = fx_traceable(_forward_by_mode, cls._eval_forward, _graph_of_mode)
        return code

    def __reduce__(self):
        body = {k: v for k, v in self.__dict__.items() if k not in ("_graph", "_train_graph")}
        body["_graphmodule_cls_name"] = type(self).__name__
        graphs = (self.graph, self.train_graph)
        return _two_modes, (body, *(pickled_code(graph) for graph in graphs), tuple(map(node_records, graphs)))

    def _deepcopy_init(self):
        name = type(self).__name__

        def init(copied: TrainEvalGraphModule, root: nn.Module, graph: fx.Graph) -> None:
            copied.__dict__["_train_graph"] = root.__dict__["_train_graph"]
            fx.GraphModule.__init__(copied, root, graph, class_name=name)

        return init


def _has_attr(module: nn.Module, target: str) -> bool:
    """Whether ``module`` has an attribute at the dotted path ``target``."""
    try:
        fetch_attr(module, target)
    except AttributeError:
        return False
    return True


def _identity_in_eval(module: object) -> bool:
    """Whether ``module`` returns its input unchanged in evaluation mode: ``nn.Identity``, dropout, and the
    stochastic depth of timm (``DropPath``) and torchvision (``StochasticDepth``)."""
    if isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)):
        return True
    kind = type(module)
    return (kind.__module__.startswith("timm.") and kind.__name__ == "DropPath") or \
        (kind.__module__.startswith("torchvision.") and kind.__name__ == "StochasticDepth")


def drop_eval_identities(gm: fx.GraphModule) -> None:
    """Remove from ``gm``'s graph, which runs in evaluation mode only (the evaluation graph of a
    :class:`TrainEvalGraphModule`), the calls of modules that return their input there (:func:`_identity_in_eval`),
    also where a skipped sub-layer receives them as values (:func:`~fxprune.passes.skipping.run_if_used`): each costs
    a module call and its attribute lookups per forward, at batch 1 a measurable share of a skipping graph's time."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and len(node.args) == 1 and not node.kwargs and \
                _identity_in_eval(gm.get_submodule(node.target)):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif node.op == "call_function" and node.target is run_if_used:
            images, sublayer, *inputs = node.args
            part = attribute(gm, sublayer)
            kept = [value for value, slot in zip(inputs, part.graph.find_nodes(op="placeholder"))
                    if not (_identity_in_eval(attribute(gm, value)) and _pass_through(part, slot))]
            part.recompile()
            node.args = (images, sublayer, *kept)
    remove_dead_code(gm.graph)
    gm.recompile()


def _pass_through(part: fx.GraphModule, slot: fx.Node) -> bool:
    """Replace each call of the module ``part`` receives as ``slot`` by its input and remove ``slot``; False (and
    nothing changed) where ``slot`` is read otherwise."""
    calls = list(slot.users)
    if not all(call.target is call_module and call.args[0] is slot and len(call.args) == 2 and not call.kwargs
               for call in calls):
        return False
    for call in calls:
        call.replace_all_uses_with(call.args[1])
        part.graph.erase_node(call)
    part.graph.erase_node(slot)
    return True


def _graph_of_mode(gm: TrainEvalGraphModule) -> fx.Graph:
    return gm.train_graph if gm.training else gm.graph


def _forward_by_mode(self: TrainEvalGraphModule, *args: Any, **kwargs: Any) -> Any:
    forward = type(self)._train_forward if self.training else type(self)._eval_forward
    return forward(self, *args, **kwargs)


def _two_modes(body: dict[str, Any], evaluation: tuple[str, str], training: tuple[str, str],
               records: tuple[Any, Any] = (None, None)) -> TrainEvalGraphModule:
    """Rebuild a pickled :class:`TrainEvalGraphModule`: each graph is traced again from its code (as ``torch.load``
    rebuilds a ``GraphModule``), over the one set of modules in ``body``, and gets its nodes' ``records`` back
    (:func:`~fxprune.capture.codegen.node_records`; none in a file saved before they were kept)."""
    eval_module, train_module = (reduce_graph_module({**body, "_code": src}, imports) for src, imports in
                                 (evaluation, training))
    for module, taken in zip((eval_module, train_module), records):
        put_back_records(module.graph, taken)
    result = TrainEvalGraphModule(eval_module, eval_module.graph, train_module.graph, type(eval_module).__name__)
    for key, value in body.items():
        if not hasattr(result, key):
            setattr(result, key, value)
    result.meta.update(body.get("meta", {}))
    return result.train(body.get("training", False))


def learned_state_dict(gm: nn.Module) -> dict[str, Tensor]:
    """The parameters and buffers of ``gm``'s learned submodules, keyed relative to ``fxprune.``."""
    prefix = LEARNED_PREFIX + "."
    return {k[len(prefix):]: v.detach().cpu() for k, v in gm.state_dict().items() if k.startswith(prefix)}


def _as_trained(policy: Policy | Compose, weights: str) -> Policy | Compose:
    """``policy`` with its learned parts' ``weights`` the file ``weights``: what a file of its trained weights
    holds, as its description says (not "untrained")."""
    if isinstance(policy, Compose):
        return Compose([_as_trained(part, weights) for part in policy.parts])
    trained = any(field.name == "weights" for field in dataclasses.fields(policy))
    return dataclasses.replace(policy, weights=weights) if trained else policy


def save_weights(gm: nn.Module, path: str | Path, backbone: bool = False, notes: Sequence[str] = ()) -> Path:
    """Write the trained weights of ``gm``'s learned submodules, with the plan's policy, to ``path`` (a file
    ``fxprune.transform(model, Policy(..., weights=path))`` loads); ``backbone``: the rest of its weights too (a
    fine-tuned backbone, which the transform then loads into its own copy of the model's weights). ``notes``: lines
    the plan of a model that loads the file shows (``fxprune train`` writes the usage it measured per block)."""
    state = learned_state_dict(gm)
    if not state:
        raise PolicyError("this model has no learned submodules: nothing to save")
    plan = getattr(gm, "fxprune_plan", None)
    described = None if plan is None else f"{_as_trained(plan.policy, Path(path).name).describe()} on {plan.model_name}"
    saved = {"policy": described, "state_dict": state, "notes": list(notes)}
    if backbone:
        prefix = LEARNED_PREFIX + "."
        saved["backbone"] = {k: v.detach().cpu() for k, v in gm.state_dict().items() if not k.startswith(prefix)}
    path = Path(path)
    torch.save(saved, path)
    return path


def read_weights(path: str | Path, what: str) -> dict:
    """The contents of the weights file ``path`` (``what``: the policy naming it, for the error)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise PolicyError(f"{what}: cannot read weights {str(path)!r}: {err}") from None
    if not isinstance(saved, dict):
        raise PolicyError(f"{what}: {str(path)!r} is not an fxprune weights file (fxprune.save_weights writes one)")
    return saved


def key_mismatch(expected: dict[str, Tensor], found: dict[str, Tensor]) -> str | None:
    """What keeps the state dict ``found`` from loading where ``expected`` is (missing, unexpected and reshaped
    keys, the first few of each), or None when it fits."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shapes = [k for k in expected if k in found and found[k].shape != expected[k].shape]
    detail = "; ".join(filter(None, [
        missing and f"missing {', '.join(missing[:4])}", unexpected and f"unexpected {', '.join(unexpected[:4])}",
        shapes and ", ".join(f"{k} is {tuple(found[k].shape)}, not {tuple(expected[k].shape)}" for k in shapes[:4]),
    ]))
    return detail or None


def load_weights(
    modules: dict[str, nn.Module], saved: dict, path: str | Path, what: str,
    translate: Callable[[dict, list[str]], dict[str, Tensor] | None] | None = None,
) -> None:
    """Load the trained weights ``saved`` (read from ``path`` by :func:`read_weights`) into ``modules`` (stable name
    relative to ``fxprune.`` → module); :class:`~fxprune.PolicyError` naming the difference when they do not fit
    (``what``: the policy). A file fxprune did not write is read by ``translate(saved, names)`` (the method's, for
    its official checkpoints), which returns its state under the names of ``modules``, in their order, or None."""
    state = saved.get("state_dict")
    if state is None and translate is not None:
        state = translate(saved, list(modules))
    if state is None:
        raise PolicyError(f"{what}: {str(path)!r} is not an fxprune weights file (fxprune.save_weights writes one)")
    expected = {f"{name}.{key}": value
                for name, module in modules.items() for key, value in module.state_dict().items()}
    detail = key_mismatch(expected, state)
    if detail is not None:
        # a file written before this version described the policy of a model in training as untrained
        described = (saved.get("policy") or "another model").removesuffix(" (untrained)")
        raise PolicyError(
            f"{what}: the weights in {str(path)!r} (for {described}) do not fit this "
            f"model and policy: {detail}. Use weights trained for the same model, blocks and method."
        )
    for name, module in modules.items():
        own = {key[len(name) + 1:]: value for key, value in state.items() if key.startswith(name + ".")}
        module.load_state_dict(own)
