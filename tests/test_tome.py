import pytest
import torch
from reference import tome_vit
from vits import (
    FAITHFUL_MODELS,
    hand_written_vit,
    hf_vit,
    image_batch,
    logits,
    timm_vit,
    torchvision_vit,
    with_explicit_softmax,
)

import fxprune
from fxprune import Compose, EViT, PolicyError, ToMe, TopK
from fxprune.analysis import SDPA_TARGETS
from fxprune.ops import size_bias, tome_merge


def _assert_matches(gm, expected_fn, model, atol=1e-6):
    x = image_batch(model, batch=4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), expected_fn(x), atol=atol, rtol=0)


@pytest.mark.parametrize("name", FAITHFUL_MODELS)
@pytest.mark.parametrize(
    "r, layers, prop_attn", [(3, (0, 1, 2, 3), True), ((2, 4), (1, 3), False)], ids=["r3", "per-layer"]
)
def test_rewritten_graph_matches_independent_eager_implementation_in_float64(name, r, layers, prop_attn):
    model = timm_vit(name).double()
    gm = fxprune.transform(model, ToMe(r, layers, prop_attn=prop_attn))
    _assert_matches(gm, lambda x: tome_vit(model, x, r, layers, prop_attn), model)


def test_explicit_softmax_attention_gets_proportional_attention_too():
    model = with_explicit_softmax(timm_vit("deit3_small_patch16_224").double())
    gm = fxprune.transform(model, ToMe(4, (0, 2)))
    _assert_matches(gm, lambda x: tome_vit(model, x, 4, (0, 2)), model)


@pytest.mark.parametrize("factory", [torchvision_vit, hf_vit, hand_written_vit])
def test_other_architectures_merge_as_planned(factory):
    model = factory()
    gm = fxprune.transform(model, ToMe(3))
    assert [r.tokens_out for r in gm.fxprune_plan.rows] == [14, 11, 8, 5]
    out = logits(gm(image_batch(model, batch=3)))
    assert out.shape[0] == 3 and torch.isfinite(out).all()


def test_models_without_class_token_are_merged():
    model = timm_vit("vit_tiny_patch16_224", class_token=False, global_pool="avg").double()
    assert model.num_prefix_tokens == 0
    gm = fxprune.transform(model, ToMe(4, (0, 1, 2)))
    assert [r.tokens_out for r in gm.fxprune_plan.rows] == [12, 8, 4, 4]
    _assert_matches(gm, lambda x: tome_vit(model, x, 4, (0, 1, 2)), model)


def test_r_is_capped_at_half_the_mergeable_tokens():
    model = timm_vit("deit_small_patch16_224")
    rows = fxprune.plan(model, ToMe(100)).rows
    assert [(r.tokens_in, r.tokens_out) for r in rows] == [(17, 9), (9, 5), (5, 3), (3, 2)]


def test_fused_attention_is_kept_and_gets_log_sizes_as_a_float_mask():
    model = timm_vit("deit_small_patch16_224")
    gm = fxprune.transform(model, ToMe(2, (1, 2)))
    sdpa = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
    assert len(sdpa) == 4
    masks = [n.kwargs.get("attn_mask") for n in sdpa]
    assert masks[:2] == [None, None] and all(m is not None and m.target is size_bias for m in masks[2:])
    plain = fxprune.transform(model, ToMe(2, (1, 2), prop_attn=False))
    assert not any(n.target is size_bias for n in plain.graph.nodes)


def test_sizes_count_the_patches_each_token_stands_for():
    model = timm_vit("deit_small_distilled_patch16_224")
    gm = fxprune.transform(model, ToMe(3))
    recorded = []

    class Recorder(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            out = super().call_function(target, args, kwargs)
            if target is tome_merge:
                recorded.append(out[1])
            return out

    with torch.no_grad():
        Recorder(gm).run(image_batch(model))
    assert len(recorded) == 4
    for size in recorded:
        assert (size.sum(dim=1) == 18).all()  # every token of the 18 is accounted for
        assert (size[:, :2] == 1).all()  # class and distillation tokens are never merged


@pytest.mark.parametrize("late", [EViT(0.5, (2,)), TopK(0.5, (2,))], ids=["evit", "topk"])
def test_compose_tome_early_and_evit_late_matches_the_reference(late):
    model = timm_vit("deit_small_patch16_224").double()
    gm = fxprune.transform(model, Compose([ToMe(2, (0, 1)), late]))
    _assert_matches(gm, lambda x: tome_vit(model, x, 2, (0, 1), evit=(0.5, (2,)), fuse=late.fuse), model)
    actions = [r.action for r in gm.fxprune_plan.rows]
    assert actions == ["tome r 2", "tome r 2", late.describe(), "dense"]
    assert f"tome r 2 | {late.describe()}" in str(gm.fxprune_plan)


def test_compose_order_does_not_matter():
    model = timm_vit("deit_small_patch16_224").double()
    a = fxprune.transform(model, Compose([ToMe(2, (0, 3)), EViT(0.5, (1,))]))
    b = fxprune.transform(model, Compose([EViT(0.5, (1,)), ToMe(2, (0, 3))]))
    x = image_batch(model, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-12, rtol=0)
        torch.testing.assert_close(a(x), tome_vit(model, x, 2, (0, 3), evit=(0.5, (1,))), atol=1e-6, rtol=0)


def test_overlapping_layers_and_bad_r_are_refused():
    with pytest.raises(PolicyError, match="block 1 is claimed by both"):
        Compose([ToMe(2, (0, 1)), EViT(0.5, (1, 2))])
    with pytest.raises(PolicyError, match="layers=None"):
        Compose([ToMe(2), EViT(0.5, (1, 2))])
    with pytest.raises(PolicyError, match="non-negative int"):
        ToMe(-1)
    with pytest.raises(PolicyError, match="3 values for 2 layers"):
        ToMe((1, 2, 3), (0, 1))
    with pytest.raises(PolicyError, match="for the model's 4 blocks"):
        fxprune.transform(timm_vit("deit_small_patch16_224"), ToMe((1, 2)))


def test_policy_text_parses_to_tome():
    assert fxprune.parse_policy("tome:r=8") == ToMe(8)
    assert fxprune.parse_policy("tome:r=4,2,layers=0,1,prop_attn=false") == ToMe((4, 2), (0, 1), False)
