import pytest
import torch
from reference import ats_step, ats_vit, evit_step, reduced_vit, tome_step
from vits import (
    FAITHFUL_MODELS,
    assert_each_image_gets_what_it_gets_alone,
    assert_same_outputs,
    digit_scenes,
    digits_vit,
    hand_written_vit,
    hf_vit,
    image_batch,
    logits,
    timm_vit,
    torchvision_vit,
    with_explicit_softmax,
)

import fxprune
from fxprune import ATS, ClusTR, Compose, EViT, PolicyError, ToMe, TopK
from fxprune.ops import ats_index, ats_picks
from fxprune.tools.show import kept_counts

CAPS = {  # (max_tokens, layers): no cap (the paper's off-the-shelf setting); a count, no cap and a ratio per layer
    "no-cap": (None, (1, 2, 3)),
    "per-layer": ((9, None, 0.6), (0, 1, 3)),
}


@pytest.mark.parametrize("setting", sorted(CAPS))
@pytest.mark.parametrize("name", FAITHFUL_MODELS)
def test_rewritten_graph_matches_the_official_rules_per_image_in_float64(name, setting):
    model = timm_vit(name).double()
    cap, layers = CAPS[setting]
    gm = fxprune.transform(model, ATS(cap, layers))
    x = image_batch(model, batch=4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ats_vit(model, x, cap, layers), atol=1e-6, rtol=0)


def test_no_cap_on_a_trained_model_collapses_repeats_as_the_official_rules_in_float64():
    model = digits_vit().double()
    gm = fxprune.transform(model, ATS(None, (1, 2, 3, 4, 5)))
    x = digit_scenes(6).double()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ats_vit(model, x, None, (1, 2, 3, 4, 5)), atol=1e-6, rtol=0)
    (_, mean, low, high), *_ = kept_counts(gm, x)
    assert high < 45 and high - low >= 4  # of 65 tokens: the collapse alone reduces, differently per image


def test_token_budgets_give_each_image_of_a_padded_batch_what_it_gets_alone():
    # every method after ATS (no cap, then its example setting) is in test_methods.py; here ATS's integer budgets
    gm = fxprune.transform(digits_vit(depth=5), ATS((41, 25, 16), (1, 3, 4)))
    x = digit_scenes(8)
    (_, _, low, high), *later = kept_counts(gm, x)
    assert high - low >= 5 and all(high - low >= 2 for _, _, low, high in later)  # padding reaches every later block
    assert_each_image_gets_what_it_gets_alone(gm, x)


AFTER_ATS = {  # chains of reductions after ATS, per image (each method after ATS alone: test_methods.py)
    "chain": Compose([ATS(None, (0,)), ToMe(3, (1,)), EViT(0.5, (2,)), ATS(0.7, (3,)), TopK(0.7, (4,)), ToMe(2, (5,))]),
    "clustr": Compose([ATS(None, (1,)), ClusTR(8, (2,), clustering="kmeans"), ATS(0.7, (3,))]),  # then ATS again
}


@pytest.mark.parametrize(
    "name, explicit", [(name, False) for name in sorted(AFTER_ATS)] + [("chain", True)],
    ids=[*sorted(AFTER_ATS), "chain-explicit-softmax"],
)
def test_reductions_after_ats_reduce_each_image_from_its_own_tokens(name, explicit):
    model = digits_vit(depth=1 + max(max(part.layers) for part in AFTER_ATS[name].policies()))  # to its last reduction
    gm = fxprune.transform(with_explicit_softmax(model) if explicit else model, AFTER_ATS[name])
    x = digit_scenes(8)
    _, _, low, high = kept_counts(gm, x)[1]
    assert high - low >= 2  # the images differ after the second reducing block too
    assert_each_image_gets_what_it_gets_alone(gm, x)


def test_inductor_runs_a_padded_chain_as_each_image_alone():
    # fxprune.lower with inductor, its default backend, and its check_inputs (the suite's other lowerings use
    # dynamo's eager backends; AOTInductor: test_exporting.py)
    chain = Compose(AFTER_ATS["chain"].policies()[:3])  # ATS, ToMe, EViT: a shorter compile than all six
    gm = fxprune.transform(digits_vit(depth=3), chain)
    x = digit_scenes(8)
    _, _, low, high = kept_counts(gm, x)[2]
    assert high - low >= 2  # the images still differ at the last reducing block
    lowered = fxprune.lower(gm, check_inputs=(x[:3],))  # inductor: the static layout, compiled, checked on 3 images
    with torch.no_grad():
        alone = torch.cat([gm(x[i : i + 1]) for i in range(len(x))])
        torch.testing.assert_close(lowered(x), alone, atol=1e-4, rtol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "policy, steps",
    [
        (Compose([ATS(30, (1,)), ToMe(6, (2, 3))]),
         lambda m: {1: ats_step(m, 30), 2: tome_step(m, 6), 3: tome_step(m, 6)}),
        (Compose([ATS(None, (1,)), EViT(0.6, (2, 4))]),
         lambda m: {1: ats_step(m, None), 2: evit_step(m, 0.6), 4: evit_step(m, 0.6)}),
        (Compose([ATS(None, (1,)), TopK(0.6, (2, 4))]),
         lambda m: {1: ats_step(m, None), 2: evit_step(m, 0.6, fuse=False), 4: evit_step(m, 0.6, fuse=False)}),
    ],
    ids=["tome", "evit", "topk"],
)
def test_a_padded_composition_matches_each_method_run_on_each_image_alone_in_float64(policy, steps):
    model = digits_vit().double()
    gm = fxprune.transform(model, policy)
    x = digit_scenes(6).double()
    proportional_after = 2 if any(isinstance(part, ToMe) for part in policy.policies()) else None
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reduced_vit(model, x, steps(model), proportional_after), atol=1e-6, rtol=0)


def test_sampling_picks_evenly_on_the_inverse_cdf_and_collapses_repeats():
    significance = torch.tensor([[0.70, 0.05, 0.15, 0.10], [0.26, 0.22, 0.28, 0.24]], dtype=torch.float64)
    order, picked = ats_picks(significance, 4, torch.ones(2, 4, dtype=torch.bool))
    # row 0: normalised CDF of the ascending scores [0, .105, .263, 1]; points .105, .404, .702, 1 pick
    # sorted positions 1, 2, 3, 3. Row 1: CDF [0, .308, .641, 1]; points .308, .538, .769, 1 pick 1, 2, 2, 3.
    assert order.tolist() == [[1, 3, 2, 0], [1, 3, 0, 2]]  # token ids, ascending significance
    assert picked.tolist() == [[False, True, True, True]] * 2


def test_a_cap_keeps_the_most_significant_picks_and_a_ratio_at_least_eight():
    torch.manual_seed(0)
    class_row, v = torch.rand(2, 31).softmax(-1), torch.randn(2, 2, 31, 4)
    rows, valid = ats_index(class_row, v, None, 1, 31)
    capped, capped_valid = ats_index(class_row, v, 6, 1, 31)
    for image in range(2):
        picks = rows[image][valid[image]].tolist()
        assert capped[image][capped_valid[image]].tolist() == [0] + picks[len(picks) - 5:]  # class, 5 most significant
    ratio, _ = ats_index(class_row, v, 0.1, 1, 31)  # round(0.1 · 31) = 3 tokens, raised to 8
    assert ratio.shape[1] == 8


def test_padding_is_never_scored_counted_or_picked():
    torch.manual_seed(0)
    class_row, v = torch.rand(1, 12).softmax(-1), torch.randn(1, 2, 12, 4)
    alone = ats_index(class_row, v, 0.5, 1, 20)  # half of its 12 tokens
    padded_row = torch.cat([class_row, torch.zeros(1, 8)], dim=1)  # 8 slots of padding (size 0) after its own
    padded_v = torch.cat([v, torch.randn(1, 2, 8, 4)], dim=2)
    size = torch.cat([torch.ones(1, 12, 1), torch.zeros(1, 8, 1)], dim=1)
    padded = ats_index(padded_row, padded_v, 0.5, 1, 20, size)
    assert [t.tolist() for t in padded] == [t.tolist() for t in alone]


@pytest.mark.parametrize("factory", [torchvision_vit, hf_vit, hand_written_vit])
def test_other_architectures_sample_under_a_cap(factory):
    model = factory()
    gm = fxprune.transform(model, ATS(9, (1, 2)))
    assert [r.tokens_out for r in gm.fxprune_plan.rows][1:3] == [9, 9]
    x = image_batch(model, batch=3)
    with torch.no_grad():
        together = logits(gm(x))
        alone = torch.cat([logits(gm(x[i : i + 1])) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_policy_caps_layers_and_plan():
    model = timm_vit("deit_small_patch16_224")
    assert fxprune.parse_policy("ats:k=50,layers=3,6,9") == ATS(50, (3, 6, 9))
    assert fxprune.parse_policy("ats:k=12,9,layers=1,2") == ATS((12, 9), (1, 2))
    assert fxprune.parse_policy("ats:layers=3-11") == ATS(None, tuple(range(3, 12)))
    assert fxprune.parse_policy("ats:k=0.7,none,layers=1-2") == ATS((0.7, None), (1, 2))
    assert ATS().bind(12) == ATS(None, tuple(range(3, 12)))  # the official DeiT-S setting
    plan = fxprune.plan(model, ATS((12, None, 0.5), (0, 1, 2)))
    assert [r.tokens_out for r in plan.rows] == [12, 12, 8, 8]  # a ratio keeps at least 8
    assert [r.action for r in plan.rows] == ["ats ≤ 12 tokens", "ats no cap", "ats ≤ 0.5·N tokens", "dense"]
    assert any("without a cap keep all N rows" in note for note in plan.notes)
    for bad in (1, 0.0, 1.5, True, "9"):
        with pytest.raises(PolicyError, match="ATS.max_tokens"):
            ATS(bad, (0,))
    with pytest.raises(PolicyError, match="2 values for 3 layers"):
        ATS((12, 9), (1, 2, 3))


@pytest.mark.parametrize("class_token", [True, False], ids=["unread-class-token", "no-class-token"])
def test_a_mean_pooled_model_pools_each_images_own_rows_in_float64(class_token):
    model = timm_vit("vit_tiny_patch16_224", class_token=class_token, global_pool="avg").double()
    assert not fxprune.analyse(model).class_token  # its class token, if any, never reaches the output
    gm = fxprune.transform(model, ATS(8, (0, 1, 2)))
    x = image_batch(model, batch=3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ats_vit(model, x, 8, (0, 1, 2)), atol=1e-6, rtol=0)
    assert_each_image_gets_what_it_gets_alone(gm, x)


def test_a_pool_that_cannot_weight_rows_is_refused_rather_than_taking_padding_in():
    model = timm_vit("vit_tiny_patch16_224", class_token=False, global_pool="max")
    with pytest.raises(fxprune.UnsupportedModelError, match=r"pools over all tokens .*amax over dim 1"):
        fxprune.transform(model, ATS(9, (1,)))
    fxprune.transform(model, ToMe(2))  # methods without padding stay available


def test_an_attention_pool_attends_to_each_images_own_rows_and_is_not_a_block_to_reduce():
    model = timm_vit("vit_tiny_patch16_224", class_token=False, global_pool="map")
    gm = fxprune.transform(model, Compose([ATS(8, (0, 2)), ToMe(2, (1,))]))
    assert_each_image_gets_what_it_gets_alone(gm, image_batch(model, batch=4))
    assert [row.action for row in fxprune.plan(model, ToMe(0)).rows][-1].startswith("dense (not reducible")
    assert_same_outputs(fxprune.transform(model, ToMe(0)), model)


def test_an_attention_pool_over_the_patch_rows_after_register_tokens_takes_the_sizes_of_those_rows():
    model = timm_vit("vit_tiny_patch16_224", class_token=False, reg_tokens=4, global_pool="map")  # kv(x[:, 4:])
    for policy in (Compose([ATS(8, (0, 2)), ToMe(2, (1,))]), fxprune.DynamicViT(0.5, (1,))):
        assert_each_image_gets_what_it_gets_alone(fxprune.transform(model, policy), image_batch(model, batch=4))
    assert_same_outputs(fxprune.transform(model, ToMe(0)), model)


def test_a_mean_over_the_patch_rows_indexed_on_every_axis_takes_their_sizes():
    from transformers import BeitConfig, BeitForImageClassification

    torch.manual_seed(0)  # BEiT's pooler: x[:, 1:, :].mean(1); relative position bias in every block
    model = BeitForImageClassification(BeitConfig(
        image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96,
        num_labels=10, use_relative_position_bias=True)).eval()
    gm = fxprune.transform(model, Compose([ATS(8, (0, 2)), ToMe(2, (1,))]))
    assert_each_image_gets_what_it_gets_alone(gm, image_batch(model, batch=4))


def test_explicit_softmax_attention_selects_after_the_residual_with_the_same_outputs():
    model = with_explicit_softmax(timm_vit("deit3_small_patch16_224").double())
    gm = fxprune.transform(model, ATS(11, (0, 2)))
    x = image_batch(model, batch=4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ats_vit(model, x, 11, (0, 2)), atol=1e-6, rtol=0)
