"""Speed of a token-reduced ViT against the dense one, eager and compiled, and the time ``transform`` takes.

The ViT is DeiT-S unless ``--model`` names another timm model (random weights).

    python benchmarks/speed.py                                  # CPU, float32, batches 1 and 32, EViT 0.7
    python benchmarks/speed.py --model vit_base_patch16_xp_224  # ViT-B/16 with parallel blocks
    python benchmarks/speed.py --policy "tome:r=8" --policy "tome:r=13"
    python benchmarks/speed.py --device cuda --dtype bfloat16 --batches 1,256
    python benchmarks/speed.py --policy "clustr:m=49" --img-size 448 --batches 1,8
    python benchmarks/speed.py --batches 1 --threads 1

Each (mode, batch) pair is measured in one interleaved run (dense, policy 1, policy 2, ..., dense, ...)
and reported as ratios of medians; absolute times are printed only for a GPU. Prints a Markdown
section for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import timm
import torch

import fxprune
from fxprune.tools.speed import interleaved, machine

DEFAULT_POLICY = "evit:keep=0.7,layers=3,6,9"


def _transform_seconds(policy, repeats: int) -> tuple[float, float]:
    """(first call, median of the next ``repeats`` calls) of ``transform`` on ViT-B/16, in seconds."""
    torch.manual_seed(0)
    vit_b = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        fxprune.transform(vit_b, policy)
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", action="append", help=f"repeatable (default: {DEFAULT_POLICY!r})")
    parser.add_argument("--model", default="deit_small_patch16_224", help="a timm model name (random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--img-size", type=int, default=224, help="input resolution (position embedding resized)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-mode", default=None, help='torch.compile mode, e.g. "reduce-overhead" (CUDA graphs)')
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    gpu = torch.device(args.device).type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True  # let cuDNN pick its fastest patch-embedding convolution

    torch.manual_seed(0)
    dense = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval()
    policies = {text: fxprune.parse_policy(text) for text in args.policy or [DEFAULT_POLICY]}
    models = {"dense": dense.to(args.device, dtype)}
    models.update({text: fxprune.transform(dense, p).to(args.device, dtype) for text, p in policies.items()})
    image = torch.randn(1, 3, args.img_size, args.img_size, device=args.device, dtype=dtype)
    macs = {name: fxprune.flops(m, image) for name, m in models.items()}
    modes = {"eager": models}
    if not args.no_compile:
        kwargs = {"mode": args.compile_mode} if args.compile_mode else {}
        label = f"compiled ({args.compile_mode})" if args.compile_mode else "compiled"
        modes[label] = {name: fxprune.lower(m, **kwargs) for name, m in models.items()}

    rows = []
    for mode, compiled in modes.items():
        for batch in batches:
            x = torch.randn(batch, 3, args.img_size, args.img_size, device=args.device, dtype=dtype)
            timing = interleaved({n: functools.partial(m, x) for n, m in compiled.items()}, repeats=args.repeats,
                                 device=args.device)
            cells = [f"{timing.ratio('dense', name):.2f}×" for name in policies]
            if gpu:
                cells += [f"{timing.median(n) * 1e3:.2f} ms ({batch / timing.median(n):,.0f} img/s)" for n in compiled]
            rows.append(f"| {mode} | {batch} | " + " | ".join(cells) + " |")
            print(rows[-1], file=sys.stderr, flush=True)
    first_policy = next(iter(policies.values()))
    first, warm = _transform_seconds(first_policy, repeats=5)

    command = "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    resolution = "" if args.img_size == 224 else f" at {args.img_size}²"
    described = "; ".join(p.describe() for p in policies.values())
    name = "DeiT-S" if args.model == "deit_small_patch16_224" else args.model
    print(f"### {name}{resolution}: {described} — {args.device}, {args.dtype}\n")
    print(f"Command: `{command.strip()}`  ")
    print(f"Machine: {machine(args.device)}  ")
    mac_ratios = ", ".join(f"`{text}` {macs['dense'] / macs[text]:.2f}×" for text in policies)
    print(f"MACs per image: dense {macs['dense'] / 1e9:.2f} G; MAC ratio dense / reduced (fxprune.flops): "
          f"{mac_ratios}. Speed ratios are medians of {args.repeats} interleaved runs"
          + (" (cudnn.benchmark on)" if gpu else "") + ".\n")
    header = "| mode | batch | " + " | ".join(f"speed ratio `{t}`" for t in policies) + " |"
    if gpu:
        header += " " + " | ".join(["dense"] + [f"`{t}`" for t in policies]) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    print("\n".join(rows))
    print(f"\n`fxprune.transform` on ViT-B/16 (224², {first_policy.describe()}): first call {first:.2f} s, "
          f"then median {warm:.2f} s over 5 calls.")


if __name__ == "__main__":
    main()
