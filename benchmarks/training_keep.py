"""How many patches a DynamicViT training graph keeps at each stage, against its targets and its evaluation graph.

    python benchmarks/training_keep.py --checkpoint dv35.ckpt --policy "dynamicvit:keep=0.35,layers=1,3,4"

The checkpoint is one ``fxprune train --out`` wrote for the digits ViT. Its training graph runs (Gumbel noise
seeded) on ``--images`` test scenes; printed per stage: the mean keep decision, the target ``ρˢ`` of the ratio
loss, and the share of the patches the evaluation graph keeps (``int(N₀ · ρˢ)``).
"""

from __future__ import annotations

import argparse

import torch

import fxprune
from fxprune.methods.dynamicvit import KEEP_KEY
from fxprune.tools.datasets import DigitScenes
from fxprune.tools.models import digits_vit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args(argv)
    policy = fxprune.parse_policy(args.policy)
    gm = fxprune.transform(digits_vit(), policy)
    gm.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=False)["model"])
    data = DigitScenes("test", args.images, seed=1)
    images = torch.stack([data[i][0] for i in range(args.images)])
    torch.manual_seed(0)
    with torch.no_grad(), fxprune.collect() as aux:
        gm.train()(images)
    bound = gm.fxprune_plan.policy
    print(f"Command: `python benchmarks/training_keep.py --checkpoint {args.checkpoint} --policy {args.policy}`\n")
    print("| stage (block) | kept in training | target ρˢ | kept at evaluation |")
    print("|---|---|---|---|")
    stages = [values[-1] for key, values in aux.items() if key.startswith(KEEP_KEY)]
    for stage, (layer, decisions) in enumerate(zip(bound.layers, stages), start=1):
        kept = bound.kept(layer) / bound.patches
        print(f"| {stage} ({layer}) | {100 * decisions.mean():.1f}% | {100 * bound.keep_rate ** stage:.1f}% | "
              f"{100 * kept:.1f}% |")


if __name__ == "__main__":
    main()
