"""Exported reduced ViTs against the exported dense model: ONNX Runtime (and AOTInductor packages) on the CPU.

    python benchmarks/export_speed.py                       # DeiT-S and the digits ViT, ONNX Runtime, batches 1, 32
    python benchmarks/export_speed.py --aoti                # also AOTInductor packages (minutes of compilation each)
    python benchmarks/export_speed.py --profile             # also where ONNX Runtime spends a batch-1 image

Every model is exported with ``fxprune.export`` (verified against eager PyTorch at two batch sizes), then the
artefacts run the same images, dense and reduced interleaved, medians of ``--repeats`` rounds (ONNX Runtime with
its default threads, one per core). Speed ratios are dense / reduced in the same runtime, beside the MAC
ratio of the plan. DeiT-S has random weights (timing only); ATS runs its static ``max_tokens`` layout, so its
exported cost is the cap's.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import timm
import torch

import fxprune
from fxprune.exporting import export, load
from fxprune.tools.models import digits_vit
from fxprune.tools.speed import interleaved, machine

DEIT_POLICIES = ["evit:keep=0.7,layers=3,6,9", "tome:r=13", "ats:k=139,98,69,layers=3,6,9",
                 "topk:keep=0.7,layers=3,6,9"]
DIGITS_POLICIES = ["evit:keep=0.7,layers=1,3,4", "tome:r=6", "topk:keep=0.7,layers=1,3,4"]


def _runners(model: torch.nn.Module, policies: list[str], folder: Path, format: str, example: torch.Tensor):
    """(name, MAC ratio, runner) for the dense model and each policy, exported in ``format``."""
    suffix = ".onnx" if format == "onnx" else ".pt2"
    dense_macs = fxprune.flops(model, example[:1])
    rows = [("dense", 1.0, model)] + [(text, None, fxprune.transform(model, fxprune.parse_policy(text)))
                                      for text in policies]
    runners = []
    for i, (name, ratio, module) in enumerate(rows):
        path = folder / f"{i}{suffix}"
        exported = export(module, example, path, format)
        print(f"  exported {name}: {exported}", flush=True)
        if ratio is None:
            ratio = dense_macs / module.fxprune_plan.macs_after
        runners.append((name, ratio, load(path, format)[0]))
    return runners


_PRODUCTS = ("MatMul", "Gemm", "Conv", "FusedMatMul", "FusedConv", "FusedGemm", "Attention")


def _ort_profile(path: Path, x: torch.Tensor, runs: int) -> tuple[float, float, collections.Counter]:
    """(kernel time per run in ms, share of it in matrix products and convolutions, kernel time per op type in ms
    per run) of the ONNX model at ``path`` on ``x``, from ONNX Runtime's profiler."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    for _ in range(runs):
        session.run(None, feed)
    trace = session.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    per_op: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
    total = sum(per_op.values())
    products = sum(ms for op, ms in per_op.items() if op in _PRODUCTS)
    return total, products / total, per_op


def _profiles(title: str, folder: Path, names: list[str], x: torch.Tensor, runs: int) -> None:
    """ONNX Runtime's kernel time at batch 1 for each artefact ``folder/<i>.onnx``, against the dense one's."""
    print(f"\n{title} — ONNX Runtime profile at batch {x.shape[0]} ({runs} runs): kernel time against dense, the "
          "share in matrix products and convolutions, and the other op types that take the most time\n")
    dense_total, dense_share, dense_ops = _ort_profile(folder / "0.onnx", x, runs)
    print(f"* dense: products {100 * dense_share:.0f}% of the kernel time")
    for i, name in enumerate(names[1:], start=1):
        total, share, ops = _ort_profile(folder / f"{i}.onnx", x, runs)
        others = [(op, ms) for op, ms in ops.most_common() if op not in _PRODUCTS][:5]
        print(f"* `{name}`: kernel time {total / dense_total:.2f} of dense's, products {100 * share:.0f}%; "
              + ", ".join(f"{op} {100 * ms / dense_total:.1f}% of dense ({100 * dense_ops.get(op, 0) / dense_total:.1f}"
                          f"% in dense)" for op, ms in others))


def _table(title: str, runners, batches: list[int], images: torch.Tensor, repeats: int) -> None:
    print(f"\n{title}\n")
    print("| policy | MAC ratio | " + " | ".join(f"speed ratio, batch {b}" for b in batches) + " |")
    print("|---|---|" + "---|" * len(batches))
    cells: dict[str, list[str]] = {name: [] for name, _, _ in runners[1:]}
    for batch in batches:
        x = images[:batch]
        timing = interleaved({name: (lambda run=run, x=x: run(x)) for name, _, run in runners}, repeats=repeats)
        for name in cells:
            cells[name].append(f"{timing.ratio('dense', name):.2f}×")
    for name, ratio, _ in runners[1:]:
        print(f"| `{name}` | {ratio:.2f}× | " + " | ".join(cells[name]) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--aoti", action="store_true", help="also AOTInductor packages")
    parser.add_argument("--profile", action="store_true",
                        help="also ONNX Runtime's profile at batch 1: where the reduced models' kernel time goes")
    parser.add_argument("--models", default="deit,digits", help="comma-separated: deit, digits")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    formats = ["onnx"] + (["aoti"] if args.aoti else [])
    print(f"Command: `python benchmarks/export_speed.py --batches {args.batches} --repeats {args.repeats} --models "
          f"{args.models}" + (" --aoti" if args.aoti else "") + (" --profile" if args.profile else "") + "`  ")
    print(f"Machine: {machine()}  ")
    import onnxruntime

    print(f"ONNX Runtime {onnxruntime.__version__} (CPUExecutionProvider); medians of {args.repeats} interleaved "
          "rounds; speed ratio = dense artefact / reduced artefact, same runtime.")
    torch.manual_seed(0)
    models = {"deit": ("DeiT-S (random weights), 224²", timm.create_model("deit_small_patch16_224").eval(),
                       DEIT_POLICIES, 224),
              "digits": ("digits ViT, 64²", digits_vit(), DIGITS_POLICIES, 64)}
    for key in args.models.split(","):
        title, model, policies, size = models[key]
        images = torch.randn(max(batches), 3, size, size)
        for format in formats:
            with tempfile.TemporaryDirectory() as folder:
                print(f"\n{title}, {format}:", flush=True)
                runners = _runners(model, policies, Path(folder), format, images[:2])
                runtime = "ONNX Runtime" if format == "onnx" else "AOTInductor package"
                _table(f"{title} — {runtime}", runners, batches, images, args.repeats)
                if args.profile and format == "onnx":
                    _profiles(title, Path(folder), [name for name, _, _ in runners], images[:1], args.repeats)


if __name__ == "__main__":
    main()
