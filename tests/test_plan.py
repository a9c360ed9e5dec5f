import re

import pytest
import timm
import torch
from vits import (
    assert_same_outputs,
    image_batch,
    timm_vit,
    with_position_bias_in_block_3,
    with_unclear_position_table_in_block_3,
)

import fxprune
from fxprune import ATS, ClusTR, Compose, DynamicViT, EViT, PolicyError, ToMe, TopK, UnsupportedModelError


def test_rows_give_tokens_in_and_out_of_every_block():
    plan = fxprune.plan(timm_vit("deit_small_patch16_224"), EViT(0.5, (1, 2)))
    assert [(r.tokens_in, r.tokens_out) for r in plan.rows] == [(17, 17), (17, 10), (10, 7), (7, 7)]
    evit = "evit keep 0.5 + fused token"
    assert [r.action for r in plan.rows] == ["dense", evit, evit, "dense"]


def test_blocks_where_a_setting_keeps_every_token_and_saves_nothing_are_noted():
    model = timm_vit("deit_small_patch16_224")  # 17 tokens
    idle = fxprune.plan(model, Compose((EViT(1.0, (1, 2)), ClusTR(17, (3,)))), fast=True).notes
    assert [note.split(" on this input")[0] for note in idle if "saves nothing" in note] == [
        "evit keep 1 + fused token saves nothing at block(s) 1, 2", "clustr 17 clusters (DPC-KNN) saves nothing at "
        "block(s) 3"]
    assert "with 17 tokens there" in idle[-1]
    for policy in (EViT(0.5, (1, 2)), ClusTR(4, (3,)), ATS(1.0, (1,)), fxprune.AdaViT(1.0, init_logit=20.0)):
        assert not any("saves nothing" in note for note in fxprune.plan(model, policy, fast=True).notes)


def test_a_setting_that_costs_more_macs_than_the_dense_model_is_noted():
    model = timm_vit("deit_small_patch16_224", img_size=64, patch_size=4, embed_dim=48, num_heads=3)  # 257 tokens
    costly = fxprune.plan(model, ToMe(1, (1,)), fast=True)  # matching 128 × 128 tokens to merge one pair
    assert costly.macs_after > costly.macs_before
    assert [note.split(" (")[0] for note in costly.notes] == ["tome r 1 costs more MACs than the dense model on this "
                                                               "input"]
    assert not any("costs more" in note for note in fxprune.plan(model, ToMe(64, (1,)), fast=True).notes)


def test_rows_carry_macs_before_and_after():
    plan = fxprune.plan(timm_vit("deit_small_patch16_224"), TopK(0.5, (1,)))
    assert plan.rows[0].macs_after == plan.rows[0].macs_before
    assert all(r.macs_after < r.macs_before for r in plan.rows[2:])
    assert plan.macs_after < plan.macs_before


@pytest.mark.parametrize(
    "policy", [EViT(0.5, (1, 2)), TopK(0.5, (1,)), ToMe(3), ATS(9, (1, 2)), Compose([ToMe(2, (0,)), TopK(0.5, (2,))])]
)
def test_fast_plan_has_the_rows_of_the_full_plan(policy):
    model = timm_vit("deit_small_patch16_224")
    full, fast = fxprune.plan(model, policy), fxprune.plan(model, policy, fast=True)
    assert str(fast) == str(full)
    assert [(r.macs_before, r.macs_after) for r in fast.rows] == [(r.macs_before, r.macs_after) for r in full.rows]


def test_printed_plan_has_one_row_per_block_and_the_totals():
    text = str(fxprune.plan(timm_vit("deit_small_patch16_224"), EViT(0.5, (1,))))
    assert text.splitlines()[0].startswith("fxprune plan for VisionTransformer (input 3×32×32, 1 prefix token(s))")
    assert "  1  blocks.1" in text and "17 → 10" in text
    assert re.search(r"MACs per image: \d+\.\d M → \d+\.\d M \(\d\.\d\d× fewer\)", text)  # M below a billion


def test_layer_out_of_range_names_the_field_and_the_block_count():
    with pytest.raises(PolicyError, match=r"EViT\.layers: block 4 does not exist; .* has 4 attention blocks \(0–3\)"):
        fxprune.plan(timm_vit("deit_small_patch16_224"), EViT(0.5, (1, 4)))


def test_non_policy_is_refused():
    with pytest.raises(PolicyError, match="expected an fxprune policy"):
        fxprune.plan(timm_vit("deit_small_patch16_224"), {"keep_rate": 0.5})
    with pytest.raises(PolicyError, match=r"got 'evit:keep=0\.7': a policy's text.* fxprune\.parse_policy\("):
        fxprune.plan(timm_vit("deit_small_patch16_224"), "evit:keep=0.7")
    with pytest.raises(PolicyError, match=r"got \[EViT.*, ToMe.*\]: several policies.* fxprune\.Compose\(\[\.\.\.\]\)"):
        fxprune.plan(timm_vit("deit_small_patch16_224"), [EViT(0.5, (1,)), fxprune.ToMe(2, (2,))])


def test_a_method_that_reads_the_class_token_needs_one_that_the_output_reads():
    model = timm_vit("vit_tiny_patch16_224", global_pool="avg")  # a class token, but the head averages patches
    message = r"has no class token that its output reads \(it has 1 prefix token\(s\)\): the output reads no prefix row"
    with pytest.raises(UnsupportedModelError, match=message):
        fxprune.transform(model, fxprune.AdaViT(0.5))


def test_a_fused_token_before_a_block_with_position_terms_takes_one_position_and_the_plan_says_so():
    model = with_position_bias_in_block_3()
    gm = fxprune.transform(model, EViT(0.5, (1,)))
    assert gm.fxprune_plan.rows[1].tokens_out < gm.fxprune_plan.rows[1].tokens_in
    notes = gm.fxprune_plan.notes
    assert any(note.startswith("evit keep 0.5") and "takes one patch's position" in note for note in notes)
    assert_same_outputs(fxprune.transform(model, EViT(1.0, (1, 3))), model)  # keep rate 1: the model itself


def test_reducing_before_a_block_that_needs_every_token_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"block 3 \(stages\.3\) needs every token.*at block 1"):
        fxprune.transform(with_unclear_position_table_in_block_3(), EViT(0.5, (1,)))


def test_plan_leaves_the_model_unchanged():
    model = timm_vit("deit_small_patch16_224")
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    fxprune.plan(model, EViT(0.5, (1,)))
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)


def test_sizes_are_not_carried_into_an_attention_over_other_keys_than_the_stream():
    model = timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                              embed_dim=64, num_heads=2, depth_token_only=1)
    with pytest.raises(UnsupportedModelError, match=r"block 3 \(blocks_token_only.0.attn\) attends over 17 keys"):
        fxprune.transform(model, fxprune.ToMe(2, (1,)))
    fxprune.transform(model, fxprune.TopK(0.5, (1,)))  # carries nothing to later blocks


class _PoolOverOtherKeys(torch.nn.Module):
    """A ViT whose attention pool attends over its final tokens and their mean: keys that are not its rows."""

    def __init__(self):
        super().__init__()
        self.vit = timm_vit("vit_tiny_patch16_224", class_token=False, global_pool="map")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit.forward_features(images)
        return self.vit.head(self.vit.attn_pool(torch.cat([x, x.mean(1, keepdim=True)], 1)))


def test_sizes_are_not_carried_into_an_attention_pool_over_other_keys_than_the_final_tokens_rows():
    model = _PoolOverOtherKeys()
    x = image_batch(model.vit, batch=2)
    with pytest.raises(UnsupportedModelError, match=r"block 4 \(vit.attn_pool\) attends over 17 keys, not rows of "
                                                     r"the final tokens"):
        fxprune.plan(model, fxprune.ToMe(2, (1,)), (x,))
    fxprune.transform(model, fxprune.TopK(0.5, (1,)), (x,))  # carries nothing to later blocks


def test_a_method_that_removes_rows_or_replaces_the_attention_after_dynamicvit_is_refused_naming_both_blocks():
    model = timm_vit("deit_small_patch16_224")
    message = (r"dynamicvit keep 0\.7 .* at block 1 keeps every row in its training graph .* block 2 \(blocks\.2\) "
               r"cannot remove rows with topk keep 0\.7 under it\. Put dynamicvit")
    with pytest.raises(UnsupportedModelError, match=message):
        fxprune.plan(model, Compose([DynamicViT(0.7, (1,)), TopK(0.7, (2,))]))
    fxprune.transform(model, Compose([TopK(0.7, (1,)), DynamicViT(0.7, (2,))]))  # after the others: fine
    with pytest.raises(UnsupportedModelError, match=r"block 2 \(blocks\.2\) cannot replace its attention with clustr"):
        fxprune.plan(model, Compose([DynamicViT(0.7, (1,)), ClusTR(4, (2,))]))  # its clustering ignores the policy
    fxprune.transform(model, Compose([ClusTR(4, (1,)), DynamicViT(0.7, (2,))]))
