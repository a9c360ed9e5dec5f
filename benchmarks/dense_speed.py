"""Speed of token reduction in a dense predictor: Hugging Face Depth Anything (its default configuration, the Small
model's shape: a DINOv2 ViT-S/14 whose blocks 8–11 a DPT neck reads), random weights, against the dense model.

    python benchmarks/dense_speed.py                                   # CPU, 518², batch 1, ToMe r 40 and r 80
    python benchmarks/dense_speed.py --policy "topk:keep=0.7,layers=3,6,9" --batches 1,4
    python benchmarks/dense_speed.py --img-size 266 --compile

The neck reads the tokens of four blocks, so each read gets the original token layout back (docs/methods.md); the
neck and head run on every patch whatever the backbone saves. Each (mode, batch) pair is measured in one
interleaved run and reported as ratios of medians. No depth accuracy: the weights are random. Prints a Markdown
section for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import transformers

import fxprune
from fxprune.tools.speed import interleaved, machine

DEFAULT_POLICIES = ("tome:r=40", "tome:r=80")


def _backbone_macs(model: torch.nn.Module) -> tuple[int, int]:
    """(dense, reduced) MACs per image of the attention blocks, from ``model``'s plan."""
    rows = model.fxprune_plan.rows
    return sum(row.macs_before for row in rows), sum(row.macs_after for row in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", action="append", help=f"repeatable (default: {', '.join(DEFAULT_POLICIES)})")
    parser.add_argument("--img-size", type=int, default=518, help="input resolution (a multiple of 14)")
    parser.add_argument("--batches", default="1", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="also measure fxprune.lower (torch.compile)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = transformers.DepthAnythingConfig()
    config.backbone_config.image_size = args.img_size
    dense = transformers.DepthAnythingForDepthEstimation(config).eval()
    example = (torch.randn(2, 3, args.img_size, args.img_size),)
    policies = {text: fxprune.parse_policy(text) for text in args.policy or DEFAULT_POLICIES}
    reduced = {text: fxprune.transform(dense, p, example_inputs=example) for text, p in policies.items()}
    models = {"dense": dense, **reduced}
    image = example[0][:1]
    macs = {name: fxprune.flops(m, image) for name, m in models.items()}
    modes = {"eager": models}
    if args.compile:
        modes["compiled"] = {name: fxprune.lower(m) for name, m in models.items()}

    rows = []
    for mode, runnable in modes.items():
        for batch in [int(b) for b in args.batches.split(",")]:
            x = torch.randn(batch, 3, args.img_size, args.img_size)
            timing = interleaved({n: functools.partial(m, x) for n, m in runnable.items()}, repeats=args.repeats)
            rows.append(f"| {mode} | {batch} | " + " | ".join(f"{timing.ratio('dense', t):.2f}×" for t in policies)
                        + " |")
            print(rows[-1], file=sys.stderr, flush=True)

    command = "python benchmarks/dense_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    tokens = (args.img_size // config.patch_size) ** 2 + 1
    described = "; ".join(p.describe() for p in policies.values())
    print(f"### Depth Anything (Small's shape) at {args.img_size}²: {described} — cpu, float32\n")
    print(f"Command: `{command.strip()}`  ")
    print(f"Machine: {machine()}  ")
    print(f"{tokens} tokens; MACs per image: dense {macs['dense'] / 1e9:.2f} G, of which the blocks "
          f"{_backbone_macs(next(iter(reduced.values())))[0] / 1e9:.2f} G (the rest: embeddings, neck and head). "
          f"Speed ratios are medians of {args.repeats} interleaved runs.\n")
    print("| policy | MAC ratio, whole model | MAC ratio, blocks |")
    print("|---|---|---|")
    for text, model in reduced.items():
        before, after = _backbone_macs(model)
        print(f"| `{text}` | {macs['dense'] / macs[text]:.2f}× | {before / after:.2f}× |")
    header = "| mode | batch | " + " | ".join(f"speed ratio `{t}`" for t in policies) + " |"
    print("\n" + header)
    print("|" + "---|" * (header.count("|") - 1))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
