"""Stride (keep every ``step``-th patch token): the graph rewrite against an eager implementation on timm ViTs."""

import pytest
import torch
from vits import image_batch, timm_vit

import fxprune
from fxprune.methods.stride import Stride


def _stride_reference(model, images, step, layers):
    """Stride on a timm ``VisionTransformer``, block by block, as its docstring states it: logits."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for i, blk in enumerate(model.blocks):
        x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
        if i in layers:
            x = torch.cat([x[:, :prefix], x[:, prefix::step]], dim=1)
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_small_distilled_patch16_224"])
@pytest.mark.parametrize("step", [2, 3])
def test_rewritten_graph_matches_the_eager_reference_in_float64(name, step):
    model = timm_vit(name).double()
    gm = fxprune.transform(model, Stride(step, (1, 2)))
    x = image_batch(model, batch=3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), _stride_reference(model, x, step, (1, 2)), atol=1e-10, rtol=0)


def test_policy_parses_from_text_and_plans_its_token_counts():
    policy = fxprune.parse_policy("stride:step=2,layers=1-2")
    assert policy == Stride(2, (1, 2))
    rows = fxprune.plan(timm_vit("deit_small_patch16_224"), policy).rows
    assert [(r.tokens_in, r.tokens_out) for r in rows[1:3]] == [(17, 9), (9, 5)]
    with pytest.raises(fxprune.PolicyError, match="step must be a positive int"):
        Stride(0, (1,))
