"""Models that ship with fxprune: a small ViT trained on :class:`fxprune.datasets.DigitScenes`."""

from __future__ import annotations

from importlib import resources

import timm
import torch
from torch import nn

__all__ = ["DIGITS_VIT", "digits_vit", "DIGITS_VIT_WEIGHTS", "digits_vit_relpos", "DIGITS_MODELS"]

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


def digits_vit_relpos(pretrained: bool = True, weights: str | None = None, **overrides) -> nn.Module:
    """The DigitScenes ViT with a learned relative position bias in every block (a timm ``Beit`` that also keeps
    the absolute position embedding), in eval mode: a position-dependent model to measure token reduction on.

    With ``pretrained`` it starts from the shipped digits ViT's weights and zero bias tables, so it computes
    exactly what :func:`digits_vit` does until it is fine-tuned (the k bias of the fused q, k, v layer, which
    ``Beit`` does not have, shifts every logit of a query alike and leaves the softmax unchanged). ``weights``: a
    file holding a fine-tuned ``state_dict`` of this model (``fxprune train --model digits-relpos --weights-out``).
    """
    model = timm.create_model("beit_base_patch16_224", pretrained=False, global_pool="token", use_abs_pos_emb=True,
                              use_rel_pos_bias=True, **{**DIGITS_VIT, **overrides})
    if pretrained:
        state = digits_vit().state_dict()
        for key in [k for k in state if k.endswith("attn.qkv.bias")]:
            q, _, v = state.pop(key).chunk(3)
            state[key.replace("qkv.bias", "q_bias")], state[key.replace("qkv.bias", "v_bias")] = q, v
        for name, value in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                state[name] = torch.zeros_like(value)
            elif name.endswith(("gamma_1", "gamma_2")):  # layer scale, which the digits ViT does not have
                state[name] = torch.ones_like(value)
        model.load_state_dict(state)
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


DIGITS_MODELS = {"digits": digits_vit, "digits-relpos": digits_vit_relpos}  # command-line name → shipped model
