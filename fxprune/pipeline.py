"""The one call: trace → analyse → plan → rewrite → verify."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from .analysis import TokenProgram, analyse
from .capture import ExampleInputs, trace
from .capture.arguments import ARGUMENTS
from .capture.codegen import keep_attribute
from .capture.values import one_at_a_time, propagate
from .errors import PolicyError, UnsupportedModelError
from .methods import method_of
from .passes import apply_passes
from .passes.checkpointing import checkpoint_blocks, checkpointing_on
from .passes.common import remove_dead_code
from .passes.guards import check_guards_at_run
from .passes.learned import (
    LEARNED_PREFIX,
    TrainEvalGraphModule,
    add_modules,
    drop_eval_identities,
    key_mismatch,
    load_weights,
    module_path_for,
    read_weights,
)
from .passes.skipping import add_in_place, skip_unused_blocks, without_heads_graphs
from .planning import ONE_TRANSFORM, Plan, PlanRow, macs_per_block, make_plan, measure_tokens
from .policies import Compose, Policy
from .verify import verify, verify_training

__all__ = ["transform", "plan"]


@one_at_a_time  # captures, propagates and checks in one go
def rewrite(
    model: nn.Module,
    policy: Policy | Compose,
    example_inputs: ExampleInputs,
    copy_weights: bool,
    second_batch: bool = True,
    restore: bool = True,
) -> tuple[fx.GraphModule, Plan]:
    """The rewritten module and its plan: what :func:`transform` returns (``second_batch=False``: checked at the
    captured batch size only, as :func:`plan` with ``fast``; ``restore`` as there) and :func:`plan` reports. The
    graph is the model's code in evaluation mode. A plan with learned methods also gets a training graph
    (:class:`~fxprune.passes.learned.TrainEvalGraphModule`), from a second capture in training mode; so does a model
    whose code differs between the modes (it branches on ``self.training``), rewritten alike, where it is in
    training mode or has a dropout rate (:func:`_has_dropout`; a model with neither is captured once), and a model
    with gradient checkpointing on, whose training graph runs each block checkpointed
    (:mod:`fxprune.passes.checkpointing`)."""
    _refuse_training_graph(model)
    _refuse_loaded(model)
    files = _weights_files(policy)
    backbone = next(((path, saved["backbone"]) for path, saved in files.items() if "backbone" in saved), None)
    captured = trace(model, example_inputs, copy_weights=copy_weights or backbone is not None, training=False)
    evaluation_code = captured.code
    program = analyse(captured)
    planned = make_plan(program, policy, restore)
    written = tuple(f"{Path(path).name}: {note}" for path, saved in files.items() for note in saved.get("notes", ()))
    checkpointing = checkpointing_on(model)
    planned = dataclasses.replace(planned, notes=(*planned.notes, *written, *program.trace.notes))
    rows = planned.rows
    learned = _learned_modules(model, program, rows, files)
    if backbone is not None:
        planned = _load_backbone(program, planned, *backbone)
    dense_macs = macs_per_block(program.gm, program.blocks, program.batch)
    gm = apply_passes(_with_modules(program, learned), program, rows, restore=restore)
    verify(gm, program, planned, second_batch)
    check_guards_at_run(gm, program.trace)
    train_gm = None
    if learned:
        training = analyse(trace(model, example_inputs, copy_weights=False, training=True))
        train_gm = apply_passes(_with_modules(training, learned), training, rows, train=True)
        verify_training(train_gm, training, planned)
    elif model.training or _has_dropout(model) or checkpointing:
        captured = trace(model, example_inputs, copy_weights=False, training=True)
        differs = captured.code != evaluation_code  # the model's code branches on its mode
        if differs:
            note = ("the model's code differs in training mode (it branches on self.training, e.g. for dropout): "
                    "that code is rewritten alike and runs in training mode; this plan is the evaluation code's")
            planned = dataclasses.replace(planned, notes=(*planned.notes, note))
        if differs or checkpointing:
            training = analyse(captured)
            train_gm = apply_passes(training.gm, training, rows, restore=restore)
            verify(train_gm, training, planned, second_batch)
    if train_gm is not None:
        check_guards_at_run(train_gm, training.trace)
        if checkpointing:
            planned = dataclasses.replace(planned, notes=(
                *planned.notes, _checkpointed(train_gm, training, checkpointing)))
        gm = _with_training_graph(gm, train_gm)
    remove_dead_code(gm.graph)  # what the rewrites left unused does not run, so its MACs do not count
    measured = planned.measured(
        measure_tokens(program, planned), dense_macs, macs_per_block(gm, program.blocks, program.batch)
    )
    if isinstance(gm, TrainEvalGraphModule):  # the evaluation graph runs in evaluation mode only
        drop_eval_identities(gm)
    without_heads_graphs(gm)
    add_in_place(gm)
    skip_unused_blocks(gm)
    _finalize(gm, measured)
    keep_attribute(gm, ARGUMENTS, getattr(program.gm, ARGUMENTS, None))  # the capture's record
    _keep_descriptions(gm, model)
    return gm.train(model.training), measured


def _refuse_training_graph(model: nn.Module) -> None:
    """Refuse to rewrite a model fxprune transformed with a training graph beside its evaluation graph: a capture
    of it is its evaluation graph alone, so the result would train with that graph."""
    if isinstance(model, TrainEvalGraphModule):
        earlier = getattr(model, "fxprune_plan", None)
        raise UnsupportedModelError(
            f"{type(model).__name__} was transformed by fxprune"
            + (f" ({earlier.policy.describe()})" if earlier is not None else "")
            + " with a training graph beside its evaluation graph (a learned method, or code that differs in "
            f"training mode); transforming it again would keep its evaluation graph alone: {ONE_TRANSFORM}, a "
            "learned method's trained parts loaded with its weights= (fxprune.save_weights writes them)"
        )


def _refuse_loaded(model: nn.Module) -> None:
    """Refuse to rewrite a model fxprune transformed that was saved and loaded (``torch.save``/``torch.load``)
    without the record of what the transform rewrote in its graph (a file saved before fxprune kept it, or one
    whose graph, traced again from its code, did not match it), by which a second transform checks that its
    rewrites fit the first's."""
    earlier = getattr(model, "fxprune_plan", None)
    if isinstance(model, fx.GraphModule) and isinstance(earlier, Plan) and "fxprune_trace" not in model.meta:
        raise UnsupportedModelError(
            f"{type(model).__name__} was transformed by fxprune ({earlier.policy.describe()}) and saved and loaded "
            "since: torch.save kept its code, not the record of what that transform rewrote, so another transform "
            f"could not check that it fits the first; {ONE_TRANSFORM}, and load the saved model's weights into the "
            "result (result.load_state_dict(loaded.state_dict()))"
        )


def _checkpointed(train_gm: fx.GraphModule, training: TokenProgram, modules: Sequence[str]) -> str:
    """Run each block of ``train_gm`` (the training graph of ``training``) checkpointed, check that it still runs on
    example values, and say so in a note naming ``modules``, those with gradient checkpointing on."""
    blocks = checkpoint_blocks(train_gm, training)
    propagate(train_gm, store=False)
    named = ", ".join(modules[:3]) + (", …" if len(modules) > 3 else "")
    return (f"gradient checkpointing (on in {named}): the training graph runs each of its {blocks} blocks "
            "checkpointed, its activations computed again in the backward pass")


def _has_dropout(model: nn.Module) -> bool:
    """Whether a module of ``model`` has a positive dropout rate: a float attribute ``p`` or ``prob``, or one whose
    name says "drop", above 0 (``nn.Dropout``, timm's drop path and patch dropout, ``nn.MultiheadAttention``'s and
    Hugging Face's attention dropout): the code that uses it may differ in training mode."""
    return any(
        isinstance(value, float) and value > 0 and (name in ("p", "prob") or "drop" in name.lower())
        for module in model.modules() for name, value in vars(module).items()
    )


def _weights_files(policy: Policy | Compose) -> dict[str, dict]:
    """The contents of every weights file the learned parts of ``policy`` name, by path, each read once (a value
    that is not a policy is refused by the plan)."""
    if not isinstance(policy, (Policy, Compose)):
        return {}
    files = {}
    for part in policy.policies():
        learned = method_of(part).learned
        path = learned.weights(part) if learned is not None else None
        if path is not None and str(path) not in files:
            files[str(path)] = read_weights(path, part.describe())
    return files


def _learned_modules(
    model: nn.Module, program: TokenProgram, rows: Sequence[PlanRow], files: dict[str, dict]
) -> dict[int, dict[str, nn.Module]]:
    """The submodules of each block of a learned method (block index → name → module), made once for the training
    and evaluation graphs, on the model's device and dtype, with the trained weights in ``files`` (path → contents)
    where the policy names them."""
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    modules: dict[int, dict[str, nn.Module]] = {}
    for row in rows:
        if row.method is None or row.method.learned is None:
            continue
        made = row.method.learned.modules(row.policy, program.blocks[row.index], program)
        if reference is not None:
            made = {name: m.to(reference.device, reference.dtype) for name, m in made.items()}
        modules[row.index] = made
    for policy in {row.policy for row in rows if row.index in modules}:
        learned = method_of(policy).learned
        weights = learned.weights(policy)
        if weights is not None:
            owned = {
                module_path_for(program.blocks[row.index], name)[len(LEARNED_PREFIX) + 1:]: module
                for row in rows if row.policy is policy for name, module in modules[row.index].items()
            }
            load_weights(owned, files[str(weights)], weights, policy.describe(), learned.translate)
    return modules


def _load_backbone(program: TokenProgram, planned: Plan, path: str, state: dict) -> Plan:
    """Load ``state`` (the fine-tuned backbone from ``path``) into ``program``'s own copy of the model's weights;
    the plan says so."""
    own = {k: v for k, v in program.gm.state_dict().items() if not k.startswith(LEARNED_PREFIX + ".")}
    detail = key_mismatch(own, state)
    if detail is not None:
        raise PolicyError(f"the backbone weights in {path!r} do not fit {program.model_name}: {detail}")
    program.gm.load_state_dict(state, strict=False)
    note = f"backbone weights loaded from {path} into the transformed model's own copy (the model is unchanged)"
    return dataclasses.replace(planned, notes=(*planned.notes, note))


def _with_modules(program: TokenProgram, modules: dict[int, dict[str, nn.Module]]) -> fx.GraphModule:
    """``program``'s graph module with the learned submodules registered."""
    for index, made in modules.items():
        add_modules(program.gm, program.blocks[index], made)
    return program.gm


def _with_training_graph(gm: fx.GraphModule, train_gm: fx.GraphModule) -> TrainEvalGraphModule:
    """One module running ``gm``'s graph in evaluation mode and ``train_gm``'s in training mode (a module only the
    training graph calls, one that evaluation-mode code skips as timm's patch dropout, is ``train_gm``'s)."""
    both = TrainEvalGraphModule(gm, gm.graph, train_gm.graph, type(gm).__name__, train_root=train_gm)
    both.meta.update(gm.meta)
    both._tracer_cls = gm._tracer_cls
    return both


def _keep_descriptions(gm: fx.GraphModule, model: nn.Module) -> None:
    """Give ``gm`` the attributes of ``model`` that describe it, shared: its own data that is no module, tensor,
    callable, flag or None, and whose name ``gm`` does not use (timm's ``pretrained_cfg`` and ``num_classes``, which
    ``timm.data.resolve_data_config`` reads for the preprocessing, Hugging Face's ``config`` with its labels). Flags
    are left out: they switch code (``dynamic_img_size``, ``grad_checkpointing``) that the graph has fixed. Kept by
    ``copy.deepcopy`` and ``torch.save``, as the plan."""
    for name, value in vars(model).items():
        if name.startswith("_") or hasattr(gm, name) or value is None or isinstance(value, bool) or callable(value) \
                or isinstance(value, (nn.Module, torch.Tensor)):
            continue
        keep_attribute(gm, name, value)


def _finalize(gm: fx.GraphModule, the_plan: Plan) -> None:
    """Drop dead nodes (resolved guards) and the example values, which hold fake tensors; generate the code that
    runs, which reads modules and parameters directly (:mod:`fxprune.capture.codegen`)."""
    graphs = [gm.graph] + ([gm.train_graph] if isinstance(gm, TrainEvalGraphModule) else [])
    for graph in graphs:
        remove_dead_code(graph)
        for node in graph.nodes:
            node.meta.pop("val", None)
            node.meta.pop("macs", None)
    gm.recompile()
    keep_attribute(gm, "fxprune_plan", the_plan)


def plan(
    model: nn.Module,
    policy: Policy | Compose,
    example_inputs: ExampleInputs = None,
    *,
    fast: bool = False,
) -> Plan:
    """What :func:`transform` would do to ``model``: one row per block (action, tokens in → out, MACs).

    Nothing of ``model`` changes; ``print(fxprune.plan(model, policy))`` shows the table. ``fast`` checks the
    rewrite at the captured batch size only, not at a second one (where batch sizes fixed as literals show):
    one fewer run of the graph on example values, for searching settings by their MACs; :func:`transform`
    always checks both.
    """
    return rewrite(model, policy, example_inputs, copy_weights=False, second_batch=not fast)[1]


def transform(
    model: nn.Module,
    policy: Policy | Compose,
    example_inputs: ExampleInputs = None,
    *,
    copy_weights: bool = False,
    verbose: bool = False,
    restore: bool = True,
) -> fx.GraphModule:
    """Rewrite ``model`` with ``policy`` and return a new ``torch.fx.GraphModule``.

    ``model`` is not modified: its modules are deep-copied before tracing. Parameters and buffers are
    shared with ``model`` (as with ``torch.fx.symbolic_trace``), so training the result trains ``model``
    too; ``copy_weights=True`` gives the result its own copy. ``example_inputs`` (a tensor, one per input, or the
    model's arguments by name, :func:`~fxprune.trace`) fixes the inputs the result takes and the input size the plan
    is made for (default: the size the model declares, batch 2). The result carries
    the plan as ``.fxprune_plan``; ``verbose=True`` prints it. Raises :class:`~fxprune.PolicyError` for an invalid
    policy and :class:`~fxprune.UnsupportedModelError` when a rewrite would compute wrong numbers.

    A model whose output is every token (a dense output) gets the original token layout back after its last
    block; ``restore=False`` returns ``(output, positions)`` instead: the reduced rows, and each row's original
    index ``[B, N']`` (−1 for padding), on the layout's static ``N'`` rows whatever the batch (padding rows zero).
    """
    gm, the_plan = rewrite(model, policy, example_inputs, copy_weights, restore=restore)
    if verbose:
        print(the_plan)
    return gm
