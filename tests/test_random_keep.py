"""Random keep (a seeded, content-blind subset of the patch tokens): the graph rewrite against an eager
implementation on timm ViTs, and the scores' properties."""

import math

import pytest
import torch
from vits import image_batch, timm_vit

import fxprune
from fxprune.methods.random_keep import RandomKeep, random_scores


def _random_keep_reference(model, images, keep_rate, layers, seed):
    """Random keep on a timm ``VisionTransformer``, block by block, as its docstring states it: logits."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for i, blk in enumerate(model.blocks):
        x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
        if i in layers:
            keep = math.ceil(keep_rate * (x.shape[1] - prefix))
            rows = random_scores(x, seed, i)[:, prefix:].topk(keep, dim=1).indices + prefix
            kept = torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :prefix], kept], dim=1)
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_small_distilled_patch16_224"])
def test_rewritten_graph_matches_the_eager_reference_in_float64(name):
    model = timm_vit(name).double()
    policy = RandomKeep(0.5, (1, 2), seed=7)
    gm = fxprune.transform(model, policy)
    x = image_batch(model, batch=3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), _random_keep_reference(model, x, 0.5, (1, 2), 7), atol=1e-10, rtol=0)


def test_scores_are_distinct_the_same_for_every_image_and_change_with_seed_and_block():
    tokens = torch.zeros(3, 197, 8)
    scores = random_scores(tokens, 0, 3)
    assert scores.shape == (3, 197) and len(set(scores[0].tolist())) == 197
    assert torch.equal(scores[0], scores[2])
    assert not torch.equal(scores, random_scores(tokens, 1, 3))
    assert not torch.equal(scores, random_scores(tokens, 0, 4))


def test_each_row_is_kept_about_keep_rate_of_the_time_over_seeds():
    keep = 98
    kept = torch.zeros(196)
    for seed in range(200):
        kept[random_scores(torch.zeros(1, 196, 1), seed, 0)[0].topk(keep).indices] += 1
    share = kept / 200
    assert share.mean().item() == pytest.approx(0.5)
    assert 0.3 < share.min().item() and share.max().item() < 0.7


def test_policy_parses_from_text_and_plans_top_k_token_counts():
    policy = fxprune.parse_policy("random:keep=0.5,layers=1-2,seed=4")
    assert policy == RandomKeep(0.5, (1, 2), seed=4)
    rows = fxprune.plan(timm_vit("deit_small_patch16_224"), policy).rows
    topk = fxprune.plan(timm_vit("deit_small_patch16_224"), fxprune.TopK(0.5, (1, 2))).rows
    assert [(r.tokens_in, r.tokens_out) for r in rows] == [(r.tokens_in, r.tokens_out) for r in topk]
    with pytest.raises(fxprune.PolicyError, match="seed must be a non-negative int"):
        RandomKeep(0.5, (1,), seed=-1)
