"""Speed of EViT-0.7 DeiT-S against dense DeiT-S, eager and compiled, and the time ``transform`` takes.

    python benchmarks/speed.py                                  # CPU, float32, batches 1 and 32
    python benchmarks/speed.py --device cuda --dtype bfloat16 --batches 1,256

Each (mode, batch) pair is measured in one interleaved run (dense, EViT, dense, EViT, ...) and
reported as the ratio of medians; absolute times are printed only for a GPU. Prints a Markdown
section for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import timm
import torch

import fxprune
from fxprune.speed import interleaved, machine


def _models(device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    evit = fxprune.transform(dense, fxprune.EViT(0.7, (3, 6, 9)))
    return dense.to(device, dtype), evit.to(device, dtype)


def _transform_seconds(repeats: int) -> tuple[float, float]:
    """(first call, median of the next ``repeats`` calls) of ``transform`` on ViT-B/16, in seconds."""
    torch.manual_seed(0)
    vit_b = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        fxprune.transform(vit_b, fxprune.EViT(0.7, (3, 6, 9)))
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-mode", default=None, help='torch.compile mode, e.g. "reduce-overhead" (CUDA graphs)')
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    gpu = torch.device(args.device).type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True  # let cuDNN pick its fastest patch-embedding convolution

    dense, evit = _models(args.device, dtype)
    image = torch.randn(1, 3, 224, 224, device=args.device, dtype=dtype)
    mac_ratio = fxprune.flops(dense, image) / fxprune.flops(evit, image)
    modes = {"eager": (dense, evit)}
    if not args.no_compile:
        kwargs = {"mode": args.compile_mode} if args.compile_mode else {}
        label = f"compiled ({args.compile_mode})" if args.compile_mode else "compiled"
        modes[label] = (fxprune.lower(dense, **kwargs), fxprune.lower(evit, **kwargs))

    rows = []
    for mode, (d, e) in modes.items():
        for batch in batches:
            x = torch.randn(batch, 3, 224, 224, device=args.device, dtype=dtype)
            timing = interleaved({"dense": lambda: d(x), "evit": lambda: e(x)}, repeats=args.repeats, device=args.device)
            absolute = ""
            if gpu:
                absolute = (f" | {timing.median('dense') * 1e3:.2f} ms ({batch / timing.median('dense'):,.0f} img/s)"
                            f" | {timing.median('evit') * 1e3:.2f} ms ({batch / timing.median('evit'):,.0f} img/s)")
            rows.append(f"| {mode} | {batch} | {timing.ratio('dense', 'evit'):.2f}×{absolute} |")
            print(rows[-1], file=sys.stderr, flush=True)
    first, warm = _transform_seconds(repeats=5)

    command = "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"### DeiT-S, EViT keep 0.7 at blocks 3, 6, 9 — {args.device}, {args.dtype}\n")
    print(f"Command: `{command.strip()}`  ")
    print(f"Machine: {machine(args.device)}  ")
    print(f"MAC ratio (dense / EViT, fxprune.flops): {mac_ratio:.2f}×; speed ratios are medians of "
          f"{args.repeats} interleaved runs" + (" (cudnn.benchmark on)" if gpu else "") + ".\n")
    header = "| mode | batch | speed ratio dense/EViT |" + (" dense | EViT |" if gpu else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    print("\n".join(rows))
    print(f"\n`fxprune.transform` on ViT-B/16 (224², EViT 0.7 at 3, 6, 9): first call {first:.2f} s, "
          f"then median {warm:.2f} s over 5 calls.")


if __name__ == "__main__":
    main()
