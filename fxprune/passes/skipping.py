"""Run a sub-layer only where it is used: on some images of the batch and, in each, some of its rows.

A sub-layer is the part of the graph computed from its ``entry`` (``[B, N, C]``) that ends in the ``exit`` added to
the residual stream. :func:`run_on_used` takes every per-image value it reads into the used layout (``[b, K, …]``:
the used images, each image's used rows padded to the most any uses), makes the shape arguments fixed before it
follow that layout, and adds its result back into the ``[B, N, C]`` stream row by row. The shapes depend on the
data, so the graph runs in eager mode only.

A block whose sub-layers are each decided per image (AdaViT) is marked by its rewrite (:func:`mark_skippable`); once the
graph is otherwise final, :func:`skip_unused_blocks` moves what the block computes after those decisions into a graph
of its own that :func:`run_block_if_used` calls: a block no image of the batch uses costs its decisions alone.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Iterable
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..analysis import Block, ancestors
from ..capture.values import worst_case_run
from ..errors import UnsupportedModelError
from ..ops import graph_op
from ..ops.emitting import collecting, emit
from ..ops.gating import (
    add_used_rows,
    batch_rows,
    bias_row,
    one_row_without_heads,
    project_from_heads,
    project_head_channels,
    project_heads,
    refuse_jit_trace,
    take_rows,
)
from .common import axis_read, between, computed_from_inputs, graph_order, insert_call, reachable, remove_dead_code
from .heads import weight_and_bias

__all__ = [
    "sublayer_nodes", "run_on_used", "run_if_used", "call_module", "move_apart", "erase_unused", "unpack",
    "add_in_place", "without_heads_graphs", "parameters_row", "mark_skippable", "skip_unused_blocks",
    "run_block_if_used", "graphs_of", "calls_of",
]

_SHAPED = ("reshape", "view", "expand")
PARTS = "fxprune_graphs"  # the plain module holding the graphs moved apart (see move_apart)
_GATED = "fxprune_gated"  # meta of a block's last node: (block name, the node name of its sub-layer decisions)


def sublayer_nodes(gm: fx.GraphModule, entry: fx.Node, exit: fx.Node, outside: set[fx.Node]) -> list[fx.Node]:
    """The nodes computed from ``entry`` on the way to ``exit`` (``exit`` included, ``entry`` not) that are not in
    ``outside``, in graph order."""
    return [node for node in between(gm, entry, exit) if node not in outside]


def _is_data(node: fx.Node, from_inputs: set[fx.Node]) -> bool:
    """Whether ``node`` is a tensor computed from the inputs (not a parameter, constant or shape); ``from_inputs``:
    :func:`~fxprune.passes.common.computed_from_inputs`."""
    if node.op == "get_attr":
        return False
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) if value is not None else node in from_inputs


_LINEAR = (torch.nn.functional.linear, project_heads, project_from_heads, project_head_channels)  # (x, weight, bias…)


def _linear_parameter(node: fx.Node, value: fx.Node, from_inputs: set[fx.Node]) -> bool:
    """Whether ``value`` is the weight or bias of the linear layer ``node`` (``F.linear`` or a head-sliced product)
    and is computed from parameters and constants only (not in ``from_inputs``), as BEiT's and EVA's q, k, v bias
    joined from its parts: the same for every image and row."""
    if value in from_inputs or node.op != "call_function" or node.target not in _LINEAR:
        return False
    return any(value is argument for argument in weight_and_bias(node))


def run_on_used(
    gm: fx.GraphModule, block: Block, nodes: list[fx.Node], entry: fx.Node, add: fx.Node, images: fx.Node,
    index: fx.Node, valid: fx.Node, per_image: dict[fx.Node, tuple[int, ...]], ready: set[fx.Node], batch: int,
    what: str, computed: tuple[fx.Node, fx.Node, fx.Node] | None = None,
) -> fx.Node:
    """Make the sub-layer ``nodes`` run on the images ``images`` ``[b]`` and, in each, the rows ``index`` ``[b, K]``
    (``valid`` marks the real ones) only; the residual sum ``add`` becomes :func:`add_used_rows` (the same node, so
    that later blocks' references stay valid), which is returned.

    ``entry`` and the per-image values ``per_image`` (node → its token axes) are taken into the used layout; the
    values in ``ready`` are in it already. Any other per-image value the sub-layer reads is refused. ``batch``: the
    batch size the graph was captured with. ``computed``: the layout ``(images, index, valid)`` the sub-layer is
    computed on where it differs from the one it is added in (:func:`~fxprune.ops.gating.one_row_without_heads`)."""
    added = (images, index, valid)
    images, index, valid = added if computed is None else computed
    inside = set(nodes)
    per_image = {entry: (1,), **per_image}
    exit = next(arg for arg in add.args[:2] if arg in inside)
    residual = next(arg for arg in add.args[:2] if arg is not exit)
    taken: dict[fx.Node, fx.Node] = {}
    created: list[fx.Node] = []
    from_inputs = computed_from_inputs(gm)
    for node in nodes:
        for value in node.all_input_nodes:
            if value in inside or value in ready or not _is_data(value, from_inputs) \
                    or _linear_parameter(node, value, from_inputs):
                continue
            if value not in per_image:
                raise UnsupportedModelError(
                    f"{what} cannot skip unused rows in {block.name}: {node.name} reads the per-image value "
                    f"{value.name}, which it does not know how to follow; use skip=False"
                )
            if value not in taken:
                with gm.graph.inserting_before(node):
                    rows = gm.graph.call_function(batch_rows, (value, images))
                    created.append(rows)
                    for axis in per_image[value]:
                        rows = gm.graph.call_function(take_rows, (rows, index, axis))
                        created.append(rows)
                taken[value] = rows
            node.replace_input_with(value, taken[value])
    created += _follow_layout(gm, nodes, taken[entry], batch=batch, tokens=block.tokens)
    add.op, add.target, add.kwargs = "call_function", add_used_rows, {}
    add.args = (residual, exit, *added)
    _run_apart(gm, block, [*created, *nodes], exit, add, images, added[0], what)
    return add


@graph_op()
def call_module(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)``: a module call in a graph that receives the module as a value."""
    return module(*args, **kwargs)


@graph_op()
def run_if_used(images: torch.Tensor | None, sublayer: fx.GraphModule, *inputs: Any,
                heads: torch.Tensor | None = None, without_heads: fx.GraphModule | None = None,
                fixed: tuple[int, ...] | None = None) -> Any:
    """The graph ``sublayer`` on ``inputs``, or None when no image uses the sub-layer (``images`` empty, as
    :func:`used_layout` gives with ``empty=True``); where no image uses a head (``heads``, the heads some image uses,
    empty), the graph ``without_heads`` on them instead (:func:`without_heads_graphs`), whose result, where it reads
    parameters alone (the inputs at the positions ``fixed``), is computed once for them (:func:`parameters_row`).
    Its ``forward`` is called directly: a graph fxprune made has no hooks, and a module call costs more than a small
    sub-layer's bookkeeping."""
    if images is not None and images.shape[0] == 0:
        return None
    if without_heads is not None and heads is not None and heads.shape[0] == 0:
        if fixed is not None:
            return parameters_row(without_heads, inputs, fixed)
        return without_heads.forward(*inputs)
    return sublayer.forward(*inputs)


_ROWS: weakref.WeakKeyDictionary[fx.GraphModule, tuple[tuple[Any, ...], Any]] = weakref.WeakKeyDictionary()


def _parameters_state(inputs: Iterable[Any]) -> tuple[Any, ...] | None:
    """What a result computed from ``inputs`` (parameters, and modules that hold them) alone depends on: the autocast
    state, and each tensor (the inputs, the modules' parameters and buffers) with its version, memory, dtype and
    device (a tensor changed in place has a new version; one moved or converted, new memory). None where a tensor
    keeps no version (made in ``torch.inference_mode``): a change in place would not be seen."""
    inputs = list(inputs)
    tensors = [value for value in inputs if isinstance(value, torch.Tensor)]
    tensors += [tensor for value in inputs if isinstance(value, torch.nn.Module)
                for tensor in (*value.parameters(), *value.buffers())]
    if any(tensor.is_inference() for tensor in tensors):
        return None
    autocast = tuple((torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in ("cpu", "cuda"))
    return (autocast, *((tensor, tensor._version, tensor.data_ptr(), tensor.dtype, tensor.device)
                        for tensor in tensors))


def _same_state(first: tuple[Any, ...], second: tuple[Any, ...]) -> bool:
    """Whether two :func:`_parameters_state` are the same: the same tensors, each as it was."""
    return len(first) == len(second) and first[0] == second[0] and all(
        a[0] is b[0] and a[1:] == b[1:] for a, b in zip(first[1:], second[1:]))


def parameters_row(part: fx.GraphModule, inputs: tuple[Any, ...], fixed: tuple[int, ...]) -> Any:
    """``part.forward(*inputs)``, a graph that reads only the inputs at the positions ``fixed``, parameters and
    modules (a sub-layer that no image uses a head of: a row from its biases), computed once and given again while
    they are as they were (:func:`_parameters_state`). Outside autograd only, and outside dispatch modes: a MAC
    counter sees it computed at each call, as a call that does not keep it computes it. Parameters made in
    ``torch.inference_mode`` keep no version: computed at each call."""
    state = None if torch.is_grad_enabled() or _get_current_dispatch_mode() is not None else \
        _parameters_state(inputs[i] for i in fixed)
    if state is None:
        return part.forward(*inputs)
    kept = _ROWS.get(part)
    if kept is None or not _same_state(kept[0], state):
        kept = _ROWS[part] = (state, part.forward(*inputs))
    return kept[1]


def _head_products_as_bias(part: fx.GraphModule) -> fx.Graph | None:
    """A copy of the graph of ``part``, a sub-layer computed on one row when no image uses a head
    (:func:`~fxprune.ops.gating.one_row_without_heads`), in which each product on the used heads
    (:func:`~fxprune.ops.gating.project_from_heads`, :func:`~fxprune.ops.gating.project_head_channels`) gives its
    bias row, and what only those products read (the heads' q, k, v and attention) is gone. None where ``part`` has
    no such product."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(part.graph, {}))
    products = [node for node in graph.nodes if node.target in (project_from_heads, project_head_channels)]
    if not products:
        return None
    for product in products:
        with graph.inserting_before(product):
            row = graph.call_function(bias_row, tuple(weight_and_bias(product)))
        product.replace_all_uses_with(row)
        graph.erase_node(product)
    remove_dead_code(graph)
    return graph


def without_heads_graphs(gm: fx.GraphModule) -> int:
    """Give each sub-layer of ``gm`` computed on one row where no image uses a head (the images it runs on come
    from :func:`~fxprune.ops.gating.one_row_without_heads`) a graph to run then, in which its products on the used
    heads give their bias rows (:func:`_head_products_as_bias`), passed to :func:`run_if_used`: the head-sliced
    products and the attention call on no heads, and what feeds them, are not run. Returns how many it gave one;
    the caller recompiles ``gm`` (the pipeline's last step does)."""
    given = 0
    for run in gm.graph.find_nodes(op="call_function", target=run_if_used):
        images, sublayer = run.args[:2]
        layout = images.args[0] if isinstance(images, fx.Node) and images.target is operator.getitem else None
        if not isinstance(layout, fx.Node) or layout.target is not one_row_without_heads or "heads" in run.kwargs:
            continue
        graph = _head_products_as_bias(gm.get_submodule(sublayer.target))
        if graph is None:
            continue
        part = _add_part(gm, graph, f"{sublayer.target.rpartition('.')[2]}_without_heads", run)
        run.kwargs = {**run.kwargs, "heads": layout.args[0], "without_heads": part, **_fixed(graph, run.args[2:])}
        given += 1
    return given


def _fixed(graph: fx.Graph, inputs: tuple[Any, ...]) -> dict[str, tuple[int, ...]]:
    """``{"fixed": positions}`` of the inputs that ``graph``, called on ``inputs``, reads, where each is an
    attribute of the model (a parameter or module): its result is then the same for every input
    (:func:`parameters_row`); else nothing."""
    read = tuple(i for i, slot in enumerate(graph.find_nodes(op="placeholder")) if slot.users)
    fixed = all(isinstance(inputs[i], fx.Node) and inputs[i].op == "get_attr" for i in read)
    return {"fixed": read} if fixed else {}


def _run_apart(gm: fx.GraphModule, block: Block, inner: list[fx.Node], exit: fx.Node, add: fx.Node,
               images: fx.Node, used: fx.Node, what: str) -> None:
    """Move the sub-layer's nodes ``inner`` (``exit`` its result, read by ``add`` only) into a graph of their own
    that :func:`run_if_used` calls on the images ``images`` it is computed on, so that a sub-layer no image uses
    (``used``, the images of its :func:`~fxprune.ops.gating.used_layout`) is not run at all (at batch 1: skipped
    outright). Left in place when a node of it has a user outside."""
    members = set(inner)
    outside = [user for node in inner for user in node.users if user not in members and user is not add]
    erase_unused(gm, outside)  # what the sub-layer's rewrite left unused (e.g. the dense projection it slices)
    if any(user not in members for node in inner if node is not exit for user in node.users) or \
            any(user is not add for user in exit.users):
        return
    sublayer, inputs = move_apart(gm, inner, [exit], add, f"skipping_{block.name.replace('.', '_')}_{what}")
    run = insert_call(gm, sublayer, run_if_used, (images, sublayer, *inputs), {}, block, f"{what}_if_used")
    add.replace_input_with(exit, run)
    for node in sorted(inner, key=graph_order(gm), reverse=True):
        gm.graph.erase_node(node)
    used.args[0].update_kwarg("empty", True)  # the layout: no image using it gives no images


def move_apart(gm: fx.GraphModule, inner: list[fx.Node], outputs: list[fx.Node], before: fx.Node, name: str
               ) -> tuple[fx.Node, list[fx.Node]]:
    """Copy the nodes ``inner`` into a parameter-free graph of their own, the submodule ``fxprune_graphs.<name>`` of
    ``gm`` returning ``outputs`` (one value, or a tuple of several), and return the node that reads it (inserted
    before ``before``) and the values to call it with. Modules ``inner`` calls are passed in as values, so the
    weights stay the model's (nothing is added to the ``state_dict``). The caller inserts the call, makes the users
    outside read it and erases ``inner``. Held one level down, such a graph is not generated again each time
    ``gm`` is (``GraphModule.recompile`` recompiles its direct children)."""
    members = set(inner)
    inner = sorted(inner, key=graph_order(gm))
    modules: dict[str, fx.Node] = {}
    with gm.graph.inserting_before(before):
        for node in inner:
            if node.op == "call_module" and node.target not in modules:
                modules[node.target] = gm.graph.get_attr(node.target)
    inputs = list(dict.fromkeys(
        [modules[node.target] for node in inner if node.op == "call_module"]
        + [value for node in inner for value in node.all_input_nodes if value not in members]
    ))
    sub = fx.Graph()
    env = {value: sub.placeholder(f"input_{i}") for i, value in enumerate(inputs)}
    for node in inner:
        args, kwargs = fx.map_arg((node.args, node.kwargs), env.__getitem__)
        if node.op == "call_module":
            env[node] = sub.call_function(call_module, (env[modules[node.target]], *args), kwargs)
        else:
            env[node] = sub.create_node(node.op, node.target, args, kwargs, name=node.name)
    sub.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[node] for node in outputs))
    return _add_part(gm, sub, name, before), inputs


def graphs_of(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """``gm`` and the graphs moved apart from it (:func:`move_apart`), which hold the nodes they run."""
    parts = getattr(gm, PARTS, None)
    return [gm, *(() if parts is None else parts.children())]


def calls_of(gm: fx.GraphModule, target: Any) -> list[fx.Node]:
    """The nodes of ``gm`` and of the graphs moved apart from it (:func:`graphs_of`) that call the function
    ``target``."""
    return [node for part in graphs_of(gm) for node in part.graph.find_nodes(op="call_function", target=target)]


def _add_part(gm: fx.GraphModule, graph: fx.Graph, name: str, before: fx.Node) -> fx.Node:
    """Hold the parameter-free ``graph`` as the submodule ``fxprune_graphs.<name>`` of ``gm`` and return the node
    that reads it, inserted before ``before``."""
    part = fx.GraphModule(torch.nn.Module(), graph, class_name=name)
    part._tracer_cls = getattr(gm, "_tracer_cls", None)  # torch.load re-traces its code as the model's
    gm.add_submodule(f"{PARTS}.{name}", part)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(f"{PARTS}.{name}")


def erase_unused(gm: fx.GraphModule, starts: Iterable[fx.Node], stop: fx.Node | None = None) -> set[fx.Node]:
    """Erase the nodes among ``starts`` and those computed from them (not going past ``stop``) that have no effect
    (pure, read only by nodes with no effect); returns them."""
    candidates = reachable(starts, lambda node: node.users, stop)
    unused: dict[fx.Node, None] = {}  # ordered, last first
    for node in reversed(gm.graph.nodes):
        if node in candidates and node.op != "output" and not node.is_impure() and all(u in unused for u in node.users):
            unused[node] = None
    for node in unused:
        gm.graph.erase_node(node)
    return set(unused)


def _follow_layout(gm: fx.GraphModule, nodes: list[fx.Node], entry: fx.Node, batch: int, tokens: int
                   ) -> list[fx.Node]:
    """Make the shape arguments of ``nodes`` fixed before them follow the used layout of ``entry``: a shape read
    of the batch size, and a shape read or literal of the token count. Returns the shape reads it adds."""
    inside = set(nodes)
    with gm.graph.inserting_after(entry):
        used_tokens = gm.graph.call_method("size", (entry, 1))
        used_images = gm.graph.call_method("size", (entry, 0))

    def follow(size: object) -> object:
        if isinstance(size, fx.Node) and size not in inside:
            value, read = size.meta.get("val"), axis_read(size)
            axis = None if read is None else read[0]  # a batch of as many images as tokens or heads: by its axis
            return used_images if value == batch and axis in (None, 0) else \
                used_tokens if value == tokens and axis != 0 else size
        return used_tokens if size == tokens and not isinstance(size, bool) else size

    for node in nodes:
        if node.op != "call_method" or node.target not in _SHAPED:
            continue
        packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
        shape = list(node.args[1]) if packed else list(node.args[1:])
        followed = [follow(size) for size in shape]
        if followed != shape:
            node.args = (node.args[0], tuple(followed)) if packed else (node.args[0], *followed)
    return [used_tokens, used_images]


def unpack(gm: fx.GraphModule, values: fx.Node, block: Block, names: tuple[str, ...]) -> tuple[fx.Node, ...]:
    """Nodes of the elements of the tuple-valued node ``values``, named ``names``."""
    elements, after = [], values
    for position, name in enumerate(names):
        after = insert_call(gm, after, operator.getitem, (values, position), {}, block, name)
        elements.append(after)
    return tuple(elements)


def _storages(value: Any) -> set[int]:
    """The memory (storage) of each tensor in an example value."""
    return {leaf.untyped_storage()._cdata for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)}


def _shared_memory(gm: fx.GraphModule) -> dict[fx.Node, set[int]] | None:
    """Each node with tensors in its example value, mapped to the memory they may use, one id per group of storages
    that may be the same: a view shares its base's (their example values share storage), and a row sum may be made
    in its residual's (:func:`add_used_rows`). None where a computed node has no example value (nothing can be
    said)."""
    groups = nx.utils.UnionFind()
    memory: dict[fx.Node, set[int]] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module") and "val" not in node.meta:
            return None
        if node.op != "output" and (keys := _storages(node.meta.get("val"))):
            memory[node] = keys
            if node.target is add_used_rows and node.args[0] in memory:
                groups.union(*keys, *memory[node.args[0]])
    return {node: {groups[key] for key in keys} for node, keys in memory.items()}


def _hands_out(user: fx.Node, value: fx.Node) -> bool:
    """Whether ``user``, a node with an effect, may keep ``value`` beyond its own call (``emit``'s ``like`` only
    gives the dtype)."""
    return user.target is not emit or user.args[0] is value


def add_in_place(gm: fx.GraphModule) -> int:
    """Let each :func:`add_used_rows` of ``gm`` (with the example values of its nodes) make its sum in its residual's
    memory where that is safe: the residual is computed in the graph (not an input, parameter or buffer, nor a view
    of one), the update is other memory, and no node after the sum reads the residual's memory as it was (the
    residual, a view of it, or an earlier row sum made in it), nor does an op with an effect keep it. Saves a copy
    of the ``[B, N, C]`` stream per used sub-layer. Returns how many sums were changed."""
    sums = gm.graph.find_nodes(op="call_function", target=add_used_rows)
    group = _shared_memory(gm) if sums else None
    if group is None:
        return 0
    order = graph_order(gm)
    changed = 0
    for add in sums:
        residual, update = add.args[:2]
        if residual not in group or group[residual] & group.get(update, set()):
            continue
        shared = [node for node, memory in group.items() if memory & group[residual]]
        earlier = [node for node in shared if order(node) < order(add)]
        if any(node.op in ("placeholder", "get_attr") for node in shared) or any(
                user is not add and (order(user) > order(add) or user.is_impure() and _hands_out(user, node))
                for node in earlier for user in node.users):
            continue
        add.kwargs = {**add.kwargs, "in_place": True}
        changed += 1
    return changed


def mark_skippable(block: str, sublayers: fx.Node, end: fx.Node) -> None:
    """Mark the block named ``block``, whose last node is ``end`` (its output stream) and whose sub-layer decisions
    ``sublayers`` ``[B, S]`` (True: used) it computes first, to run only where an image uses one of its sub-layers
    (:func:`skip_unused_blocks`)."""
    end.meta[_GATED] = (block, sublayers.name)


def _run_anyway(used: torch.Tensor, stream: torch.Tensor, block: fx.GraphModule, *inputs: Any) -> Any:
    return worst_case_run(block, *inputs)


@graph_op(worst_case=_run_anyway)
def run_block_if_used(used: torch.Tensor, stream: torch.Tensor, block: fx.GraphModule, *inputs: Any) -> Any:
    """The graph ``block`` on ``inputs`` (a block after its sub-layer decisions ``used`` ``[B, S]``), or the block's
    input ``stream`` ``[B, N, C]`` as it is where no image uses any of its sub-layers, unless a
    :func:`~fxprune.collect` context is open (every block then reports its decisions, as the masked graph does). As
    :func:`run_if_used`, ``forward`` is called directly."""
    refuse_jit_trace()
    if not collecting() and not bool(used.any()):
        return stream
    return block.forward(*inputs)


def _stream_into(end: fx.Node, later: set[fx.Node]) -> fx.Node:
    """The stream that a block whose last node is ``end`` adds its sub-layers' results to: where the row sums
    (:func:`~fxprune.ops.gating.add_used_rows`) ending in ``end`` start from, among the nodes ``later``."""
    while end in later and end.target is add_used_rows:
        end = end.args[0]
    return end


def skip_unused_blocks(gm: fx.GraphModule) -> int:
    """For each block :func:`mark_skippable` marked, move its nodes but its sub-layer decisions (and what they are
    computed from), inputs and attribute reads into a graph of their own that :func:`run_block_if_used` calls:
    where no image uses either sub-layer, the block's row and head decisions, layouts and row sums are not run (at
    batch 1 their many small calls cost more than the sub-layer decisions do). Left as it is where a value the block
    computes is read after it, other than its output. Returns how many blocks it moved; the caller recompiles
    ``gm``."""
    names = {node.name: node for node in gm.graph.nodes}
    moved = 0
    for end in [node for node in gm.graph.nodes if _GATED in node.meta]:
        block, decided = end.meta.pop(_GATED)
        sublayers = names.get(decided)
        later = set(_span(sublayers, end)) if sublayers is not None else set()
        if end not in later:  # its sub-layer decisions are gone, or do not come before it
            continue
        stream = _stream_into(end, later)
        condition = ancestors([sublayers])
        inner = [node for node in _span(stream, end) if node.op not in ("placeholder", "get_attr")
                 and node not in condition]
        members = set(inner)
        if stream in later or any(user not in members for node in inner if node is not end for user in node.users):
            continue
        prefix = block.replace(".", "_")
        part, inputs = move_apart(gm, inner, [end], end, f"block_{prefix}")
        with gm.graph.inserting_before(end):
            run = gm.graph.create_node("call_function", run_block_if_used, (sublayers, stream, part, *inputs),
                                       name=f"{prefix}_if_used")
        run.meta.update({key: sublayers.meta[key] for key in ("fxprune", "nn_module_stack") if key in sublayers.meta})
        end.replace_all_uses_with(run)
        for node in reversed(inner):
            gm.graph.erase_node(node)
        moved += 1
    return moved


def _span(first: fx.Node, last: fx.Node) -> list[fx.Node]:
    """The nodes after ``first`` up to ``last``, in graph order (empty where ``last`` does not follow ``first``)."""
    span, node = [], first
    while node is not last and node.next.op != "root":
        node = node.next
        span.append(node)
    return span if node is last else []
