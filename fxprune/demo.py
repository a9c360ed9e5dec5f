"""The README's main job: DeiT-S (random weights, no download) with EViT 0.7 at blocks 3, 6, 9.

Prints the plan, the MACs before and after, and the measured eager speed ratio on this machine.
"""

from __future__ import annotations

import timm
import torch

from .flops import flops
from .policies import EViT
from .speed import interleaved, machine
from .transform import transform


def run(batch: int = 16, repeats: int = 5, seed: int = 0) -> float:
    """Run the demo; returns the measured speed ratio (dense time / EViT time)."""
    torch.manual_seed(seed)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    policy = EViT(keep_rate=0.7, layers=(3, 6, 9))
    print(f"fxprune demo: timm deit_small_patch16_224 (random weights), {policy}\n")
    fast = transform(model, policy, verbose=True)
    image = torch.randn(1, 3, 224, 224)
    dense_macs, fast_macs = flops(model, image), flops(fast, image)
    print(f"\nMACs per image (measured by fxprune.flops): dense {dense_macs / 1e9:.2f} G, "
          f"EViT {fast_macs / 1e9:.2f} G, ratio {dense_macs / fast_macs:.2f}×")
    x = torch.randn(batch, 3, 224, 224)
    timing = interleaved({"dense": lambda: model(x), "evit": lambda: fast(x)}, repeats=repeats)
    ratio = timing.ratio("dense", "evit")
    print(f"measured speed, eager, batch {batch}, median of {repeats} interleaved runs: "
          f"EViT is {ratio:.2f}× faster than dense")
    print(f"machine: {machine()}")
    return ratio
