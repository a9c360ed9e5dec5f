"""The README's main job, on the embedded benchmark: the shipped DigitScenes ViT with EViT.

Prints the plan, accuracy and MACs dense vs reduced on held-out test scenes, and the speed ratio
measured on this machine; writes a picture of the patches each reduced block kept.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..pipeline import transform
from ..policies import Policy
from .bench import run as run_bench
from .datasets import DigitScenes
from .models import digits_vit
from .search import default_policy
from .show import draw_kept_patches


def run(
    scenes: int = 1000, picture: str | Path = "kept_tokens.png", policy: Policy | None = None, repeats: int = 5
) -> None:
    """Run the demo on ``scenes`` test scenes; the picture goes to ``picture``.

    The default policy is EViT at blocks 1, 3, 4 with the keep rate that leaves 70% of the dense MACs.
    """
    model = digits_vit()
    data = DigitScenes("test", scenes, seed=1)
    policy = policy or default_policy(model)
    print(f"fxprune demo: the DigitScenes ViT shipped with fxprune, {policy}\n")
    fast = transform(model, policy, verbose=True)
    print()
    result = run_bench(model, [policy], data, speed_batch=64, repeats=repeats, model_name="digits_vit",
                       data_name="DigitScenes test (held-out digits)")
    print(result.markdown())
    shown = [data.scene(i) for i in range(6)]
    images = torch.stack([s.image for s in shown])
    path = draw_kept_patches(fast, images, picture, labels=[str(s.label) for s in shown])
    print(f"\nwrote {path}: six test scenes and the patches each reduced block kept")
