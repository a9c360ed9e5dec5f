"""Exported reduced ViTs against the exported dense model: ONNX Runtime (and AOTInductor packages) on the CPU.

    python benchmarks/export_speed.py                       # DeiT-S and the digits ViT, ONNX Runtime, batches 1, 32
    python benchmarks/export_speed.py --aoti                # also AOTInductor packages (minutes of compilation each)

Every model is exported with ``fxprune.export`` (verified against eager PyTorch at two batch sizes), then the
artefacts run the same images, dense and reduced interleaved, medians of ``--repeats`` rounds (ONNX Runtime with
its default threads, one per core). Speed ratios are dense / reduced in the same runtime, beside the MAC
ratio of the plan. DeiT-S has random weights (timing only); ATS runs its static ``max_tokens`` layout, so its
exported cost is the cap's.
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--models", default="deit,digits", help="comma-separated: deit, digits")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    formats = ["onnx"] + (["aoti"] if args.aoti else [])
    print(f"Command: `python benchmarks/export_speed.py --batches {args.batches} --repeats {args.repeats} --models "
          f"{args.models}" + (" --aoti" if args.aoti else "") + "`  ")
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


if __name__ == "__main__":
    main()
