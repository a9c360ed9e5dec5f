"""Models that ship with fxprune: a small ViT trained on :class:`fxprune.datasets.DigitScenes`."""

from __future__ import annotations

from importlib import resources

import timm
import torch
from torch import nn

__all__ = ["DIGITS_VIT", "digits_vit", "DIGITS_VIT_WEIGHTS"]

# timm VisionTransformer settings: 64×64 scenes, 8×8 patches (64 patch tokens + class token), 6 blocks
DIGITS_VIT = dict(img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=2, num_classes=10)
DIGITS_VIT_WEIGHTS = "digits_vit.pt"


def digits_vit(pretrained: bool = True, **overrides) -> nn.Module:
    """The DigitScenes ViT (a timm ``VisionTransformer``), in eval mode.

    With ``pretrained`` its weights are the ones shipped in the package, trained by
    ``examples/train_digits_vit.py``; inputs are DigitScenes images ``[B, 3, 64, 64]`` in ``[0, 1]``.
    ``overrides`` go to ``timm.create_model`` (training uses ``drop_path_rate``).
    """
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**DIGITS_VIT, **overrides})
    if pretrained:
        with resources.files("fxprune.tools.weights").joinpath(DIGITS_VIT_WEIGHTS).open("rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() for k, v in state["model"].items()})
    return model.eval()
