"""Deploy a transformed model: an ONNX model, a ``torch.export`` program (``.pt2``) or an AOTInductor package,
checked against eager PyTorch before it is handed over.

Every format goes through ``torch.export`` with a dynamic batch dimension; token counts stay static (ATS exports
in its ``max_tokens`` layout, each image's own count carried by the size-0 padding). Selections use the stable
orders of :mod:`fxprune.ops.ordering`, which every runtime computes alike. The plan travels in the artefact's
metadata (:data:`PLAN_KEY`). Verification runs the artefact (ONNX Runtime, the loaded program, the loaded
package) on the example inputs and on a second batch size and raises :class:`ExportError` where it differs from
eager PyTorch by more than the tolerance.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import math
import operator
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import nn

from .errors import FxPruneError
from .lowering import refuse_data_dependent

__all__ = ["FORMATS", "OPSET", "PLAN_KEY", "ExportError", "Exported", "export", "load", "run"]

FORMATS = ("onnx", "pt2", "aoti")
OPSET = 18  # the ONNX opset fxprune exports to
PLAN_KEY = "fxprune_plan"  # the plan's text, in the metadata of every format
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.bfloat16: 5e-2, torch.float16: 1e-2}


class ExportError(FxPruneError):
    """A transformed model could not be exported, or its artefact does not compute what the model computes."""


@dataclasses.dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote: the ``path``, its ``format`` (``opset`` for ONNX) and, when verified, the largest
    absolute difference from eager PyTorch at each batch size it ran (``errors``: ``(batch, difference)``)."""

    path: Path
    format: str
    opset: int | None
    errors: tuple[tuple[int, float], ...]

    def __str__(self) -> str:
        checked = ", ".join(f"batch {b}: max |Δ| {e:.1e}" for b, e in self.errors) or "not verified"
        opset = f" (opset {self.opset})" if self.opset else ""
        return f"{self.format}{opset} → {self.path}; {checked}"


def _format(path: Path, format: str | None) -> str:
    if format is None:
        format = {".onnx": "onnx", ".pt2": "pt2"}.get(path.suffix)
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r} for {path}: choose one of {', '.join(FORMATS)} "
                          "(format=...; .onnx and .pt2 are recognised by their suffix)")
    return format


def _plan_text(gm: nn.Module) -> str:
    plan = getattr(gm, "fxprune_plan", None)
    return "" if plan is None else str(plan)


def _batched(example_inputs: Sequence[torch.Tensor], batch: int) -> tuple[torch.Tensor, ...]:
    """The example inputs with ``batch`` images: their images repeated in turn."""
    out = []
    for x in example_inputs:
        index = torch.arange(batch, device=x.device) % x.shape[0]
        out.append(x.index_select(0, index))
    return tuple(out)


def _program(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` on ``inputs`` with the batch dimension of every input dynamic."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = torch.export.ShapesCollection()
    for x in inputs:
        shapes[x] = {0: batch}
    try:
        return torch.export.export(module, inputs, dynamic_shapes=shapes, strict=False)
    except Exception as error:
        raise ExportError(f"torch.export failed on {type(module).__name__}: {type(error).__name__}: "
                          f"{_first_line(error)}") from error


def _quiet():
    """Silence the exporters' progress output."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def _contiguous_attention(program: torch.export.ExportedProgram) -> None:
    """Give every SDPA output of ``program`` a contiguous copy that its users read instead (ONNX has no strides: the
    copy is an identity there). ``torch.export`` records the fused kernel's output layout, ``[B, N, H, d]`` in
    memory, so a ``transpose(1, 2).reshape(B, N, C)`` after it becomes a view; the ONNX exporter then computes SDPA
    with a mask (relative position bias: ``vit_relpos_*``) from its parts, whose output is laid out ``[B, H, N, d]``,
    and fails on that view ("Cannot view a tensor with shape …")."""
    graph = program.graph_module.graph
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.scaled_dot_product_attention.default):
        with graph.inserting_after(node):
            copied = graph.call_function(torch.ops.aten.clone.default, (node,),
                                         {"memory_format": torch.contiguous_format})
        node.replace_all_uses_with(copied, delete_user_cb=functools.partial(operator.is_not, copied))
        copied.meta = {**node.meta, "val": node.meta["val"].clone(memory_format=torch.contiguous_format)}
    program.graph_module.recompile()


def _write_onnx(program: torch.export.ExportedProgram, path: Path, plan: str) -> None:
    try:
        import onnx
    except ImportError as error:
        raise ExportError("ONNX export needs the export extra: pip install 'fxprune[export]'") from error
    _contiguous_attention(program)
    try:
        with _quiet():
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=OPSET, verbose=False)
    except Exception as error:
        raise ExportError(f"the ONNX exporter failed: {type(error).__name__}: {_first_line(error)}") from error
    onnx_program.save(str(path))
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {PLAN_KEY: plan})
    onnx.save(model, str(path))


def _first_line(error: Exception) -> str:
    """The line of ``error``'s message that says what failed: its first ``<class …>`` summary line, else its first
    line, without terminal colours and cut to 300 characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line for line in text.splitlines() if line.strip()]
    summary = [line for line in lines if line.startswith("<class")]
    return (summary or lines or [""])[0][:300]


def _write_aoti(program: torch.export.ExportedProgram, path: Path, plan: str) -> None:
    try:
        with _quiet():
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(path), inductor_configs={"aot_inductor.metadata": {PLAN_KEY: plan}})
    except Exception as error:
        raise ExportError(f"AOTInductor could not compile the program: {type(error).__name__}: "
                          f"{_first_line(error)}") from error


def load(path: str | Path, format: str | None = None):
    """A callable that runs the artefact at ``path`` on tensors and returns the flat list of its output tensors,
    and the plan stored with it: ``(runner, plan)``. ``format`` as in :func:`export` (``"aoti"`` must be named)."""
    path = Path(path)
    format = _format(path, format)
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        plan = session.get_modelmeta().custom_metadata_map.get(PLAN_KEY)
        names = [i.name for i in session.get_inputs()]

        def run_onnx(*inputs: torch.Tensor) -> list[torch.Tensor]:
            feed = {name: x.detach().cpu().numpy() for name, x in zip(names, inputs)}
            return [torch.from_numpy(out) for out in session.run(None, feed)]

        return run_onnx, plan
    if format == "pt2":
        extra = {PLAN_KEY: ""}
        program = torch.export.load(str(path), extra_files=extra)
        module = program.module()
        return (lambda *inputs: pytree.tree_leaves(module(*inputs))), extra[PLAN_KEY]
    package = torch._inductor.aoti_load_package(str(path))
    return (lambda *inputs: pytree.tree_leaves(package(*inputs))), package.get_metadata().get(PLAN_KEY)


def run(path: str | Path, *inputs: torch.Tensor, format: str | None = None) -> list[torch.Tensor]:
    """The flat output tensors of the artefact at ``path`` on ``inputs``."""
    return load(path, format)[0](*inputs)


def _difference(expected: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    if len(expected) != len(got):
        return math.inf
    worst = 0.0
    for e, g in zip(expected, got):
        if tuple(e.shape) != tuple(g.shape):
            return math.inf
        worst = max(worst, (e.double() - g.double().to(e.device)).abs().max().item() if e.numel() else 0.0)
    return worst


def export(
    gm: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | Path,
    format: str | None = None,
    *,
    verify: bool = True,
    dtype: torch.dtype | None = None,
    atol: float | None = None,
) -> Exported:
    """Export ``gm`` (a transformed model, or any module ``torch.export`` can capture) in evaluation mode to
    ``path``: ``format`` ``"onnx"`` (the dynamo-based exporter, opset :data:`OPSET`), ``"pt2"`` (the
    ``ExportedProgram``, ``torch.export.save``) or ``"aoti"`` (an AOTInductor package that runs without Python
    model code); by default from the suffix (``.onnx``, ``.pt2``).

    The batch dimension is dynamic (traced at 2 images at least, as a batch of 1 would be specialised); token
    counts are static. ``dtype`` (e.g. ``torch.bfloat16``) exports a copy in that dtype. With ``verify`` the
    artefact runs on ``example_inputs`` and on one more image than them, and :class:`ExportError` is raised
    where any output differs from eager PyTorch (in the same dtype) by more than ``atol`` (default 1e-4 in
    float32, 5e-2 in bfloat16). ``gm`` is left as it was. Returns what was written, with the differences seen.
    """
    path = Path(path)
    format = _format(path, format)
    refuse_data_dependent(gm, ExportError, "no exported program has", "export")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    module = gm
    if dtype is not None:
        if any(t.is_floating_point() and t.dtype != dtype for t in [*gm.parameters(), *gm.buffers()]):
            module = copy.deepcopy(gm).to(dtype)
        inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    was_training = module.training
    module.eval()
    try:
        traced = _batched(inputs, max(2, inputs[0].shape[0]))
        with torch.no_grad():
            program = _program(module, traced)
        plan = _plan_text(gm)
        path.parent.mkdir(parents=True, exist_ok=True)
        if format == "onnx":
            _write_onnx(program, path, plan)
        elif format == "pt2":
            torch.export.save(program, str(path), extra_files={PLAN_KEY: plan})
        else:
            _write_aoti(program, path, plan)
        errors: list[tuple[int, float]] = []
        if verify:
            try:
                runner, _ = load(path, format)
            except Exception as error:
                raise ExportError(f"the {format} runtime here cannot load {path} (in {inputs[0].dtype}): "
                                  f"{type(error).__name__}: {_first_line(error)}; export in float32, or skip the "
                                  "check (verify=False, --no-verify) for a runtime that supports it") from error
            tolerance = atol if atol is not None else TOLERANCE.get(inputs[0].dtype, 1e-4)
            for batch in (inputs[0].shape[0], inputs[0].shape[0] + 1):
                batch_inputs = _batched(inputs, batch)
                with torch.no_grad():
                    expected = pytree.tree_leaves(module(*batch_inputs))
                try:
                    got = runner(*batch_inputs)
                except Exception as error:
                    raise ExportError(f"the {format} artefact {path} could not run at batch {batch}: "
                                      f"{type(error).__name__}: {_first_line(error)}") from error
                difference = _difference(expected, got)
                errors.append((batch, difference))
                if not difference <= tolerance:
                    raise ExportError(f"the {format} artefact {path} differs from eager PyTorch at batch {batch}: "
                                      f"max |Δ| {difference:.2e} > {tolerance:.0e}; do not deploy it "
                                      "(export with verify=False to inspect it)")
    finally:
        module.train(was_training)
    return Exported(path, format, OPSET if format == "onnx" else None, tuple(errors))
