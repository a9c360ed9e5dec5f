import pytest
import torch
from reference import ats_vit
from vits import (
    ALL_MODELS,
    assert_compiles_once,
    assert_same_outputs,
    hand_written_vit,
    hf_vit,
    image_batch,
    logits,
    timm_vit,
    torchvision_vit,
    with_explicit_softmax,
)

import fxprune
from fxprune import ATS, Compose, PolicyError, ToMe
from fxprune.ops import ats_sample
from fxprune.show import kept_counts

FAITHFUL_MODELS = [
    "deit_small_patch16_224",  # DeiT-S-shaped
    "deit3_small_patch16_224",  # LayerScale
    "deit_small_distilled_patch16_224",  # two prefix tokens
    "vit_small_patch14_reg4_dinov2",  # LayerScale and four register tokens
]


@pytest.mark.parametrize("name", FAITHFUL_MODELS)
def test_rewritten_graph_matches_independent_per_image_implementation_in_float64(name):
    model = timm_vit(name).double()
    tokens = fxprune.analyse(model).tokens
    max_tokens = tokens * 2 // 3
    gm = fxprune.transform(model, ATS(max_tokens, (1, 2)))
    x = image_batch(model, batch=4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ats_vit(model, x, max_tokens, (1, 2)), atol=1e-6, rtol=0)


def test_a_padded_batch_gives_each_image_what_it_gets_alone():
    model = timm_vit("deit_small_patch16_224")
    gm = fxprune.transform(model, ATS(9, (0, 2)))
    x = image_batch(model, batch=6)
    with torch.no_grad():
        together = gm(x)
        for i in range(6):
            torch.testing.assert_close(gm(x[i : i + 1]), together[i : i + 1], atol=1e-5, rtol=0)


def test_kept_counts_adapt_to_each_image_and_are_reported():
    from fxprune.datasets import DigitScenes
    from fxprune.models import digits_vit

    data = DigitScenes("test", 16, seed=1)
    images = torch.stack([data[i][0] for i in range(16)])
    gm = fxprune.transform(digits_vit(), ATS(40, (1, 3)))  # trained weights: attention is peaked
    (first, mean, low, high), (second, *_) = kept_counts(gm, images)
    assert (first, second) == (1, 3) and low < high <= 40 and low <= mean <= high


def test_sampling_picks_evenly_on_the_inverse_cdf_and_collapses_repeats():
    significance = torch.tensor([[0.70, 0.05, 0.15, 0.10], [0.26, 0.22, 0.28, 0.24]], dtype=torch.float64)
    index, valid = ats_sample(significance, 4)
    # row 0: normalised CDF of the ascending scores [0, .105, .263, 1]; points .105, .404, .702, 1 pick
    # sorted positions 1, 2, 3, 3. Row 1: CDF [0, .308, .641, 1]; points .308, .538, .769, 1 pick 1, 2, 2, 3.
    assert valid.tolist() == [[True, True, True, False]] * 2
    assert index[:, :3].tolist() == [[3, 2, 0], [3, 0, 2]]  # token ids, ascending significance


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_max_tokens_at_least_the_sequence_reproduces_every_supported_model(name):
    model = ALL_MODELS[name]()
    tokens = fxprune.analyse(model).tokens
    assert_same_outputs(fxprune.transform(model, ATS(tokens, (0, 1, 2))), model)


@pytest.mark.parametrize("factory", [torchvision_vit, hf_vit, hand_written_vit])
def test_other_architectures_sample_per_image(factory):
    model = factory()
    gm = fxprune.transform(model, ATS(9, (1, 2)))
    x = image_batch(model, batch=3)
    with torch.no_grad():
        together = logits(gm(x))
        alone = torch.cat([logits(gm(x[i : i + 1])) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_compiled_static_layout_matches_eager_and_compiles_once():
    model = timm_vit("deit_small_patch16_224")
    assert_compiles_once(fxprune.transform(model, ATS(9, (1, 2))), model)  # padded static layout vs compacted


def test_training_mode_gradients_reach_the_backbone():
    model = timm_vit("deit_small_patch16_224").train()
    gm = fxprune.transform(model, ATS(9, (1,)))
    gm(image_batch(model)).logsumexp(-1).sum().backward()
    for block in range(4):
        assert gm.get_parameter(f"blocks.{block}.attn.qkv.weight").grad.abs().sum() > 0


def test_composes_with_tome_and_refuses_bad_settings():
    model = timm_vit("deit_small_patch16_224")
    gm = fxprune.transform(model, Compose([ToMe(2, (0,)), ATS(9, (2,))]))
    assert [r.action for r in gm.fxprune_plan.rows] == ["tome r 2", "dense", "ats ≤ 9 tokens", "dense"]
    x = image_batch(model, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[1:2], gm(x[1:2]), atol=1e-5, rtol=0)
    with pytest.raises(PolicyError, match="at least 2"):
        ATS(1, (0,))
    assert fxprune.parse_policy("ats:k=50,layers=3,6,9") == ATS(50, (3, 6, 9))
    assert fxprune.parse_policy("ats:k=12,9,layers=1,2") == ATS((12, 9), (1, 2))
    assert [r.tokens_out for r in fxprune.plan(model, ATS((12, 9), (1, 2))).rows] == [17, 12, 9, 9]
    with pytest.raises(PolicyError, match="2 values for 3 layers"):
        ATS((12, 9), (1, 2, 3))
    with pytest.raises(fxprune.UnsupportedModelError, match="class token"):
        fxprune.transform(timm_vit("vit_tiny_patch16_224", class_token=False, global_pool="avg"), ATS(9, (1,)))


def test_models_that_average_all_tokens_are_refused_rather_than_averaging_padding():
    model = timm_vit("vit_tiny_patch16_224", global_pool="avg")  # class token, but the head averages tokens
    with pytest.raises(fxprune.UnsupportedModelError, match=r"pools over all tokens .*mean over dim 1"):
        fxprune.transform(model, ATS(9, (1,)))
    fxprune.transform(model, ToMe(2))  # methods without padding stay available


def test_explicit_softmax_attention_selects_after_the_residual_with_the_same_outputs():
    model = with_explicit_softmax(timm_vit("deit3_small_patch16_224").double())
    gm = fxprune.transform(model, ATS(11, (0, 2)))
    x = image_batch(model, batch=4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ats_vit(model, x, 11, (0, 2)), atol=1e-6, rtol=0)
