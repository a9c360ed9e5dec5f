from functools import partial

import pytest
import torch
from PIL import Image

import fxprune
from fxprune import ATS, ClusTR, EViT, ToMe, TopK
from fxprune.methods.ats import ats_from
from fxprune.tools.bench import evaluate, per_image_macs, plot, run
from fxprune.tools.datasets import DigitScenes
from fxprune.tools.models import digits_vit
from fxprune.tools.search import default_layers, fit_policy, keep_rate_for, mac_fraction, sweep_policies, tome_r_for


@pytest.fixture(scope="module")
def result():
    data = DigitScenes("test", 200, seed=1)
    return run(digits_vit(), [EViT(0.5, (1, 3)), TopK(0.5, (1, 3)), ToMe(4)], data, batch_size=100, speed_batch=16,
               repeats=2, progress=False, model_name="digits_vit", data_name="DigitScenes test")


def test_one_row_per_model_with_accuracy_macs_and_speed(result):
    dense, evit, topk, tome = result.rows
    assert dense.name == "dense" and dense.mac_fraction == 1.0 and dense.speed_ratio == 1.0
    assert evit.name == "evit keep 0.5 + fused token @ 1,3" and topk.name == "topk keep 0.5 @ 1,3"
    assert tome.name == "tome r 4 @ every block" and tome.mac_fraction < 1.0
    assert all(0.0 <= r.accuracy <= 1.0 for r in result.rows)
    assert topk.mac_fraction < evit.mac_fraction < 1.0
    assert all(r.speed_ratio > 0 for r in result.rows)


def test_output_error_is_relative_to_the_dense_logits(result):
    data = DigitScenes("test", 200, seed=1)
    loader = torch.utils.data.DataLoader(data, batch_size=100)
    with torch.no_grad():
        dense = torch.cat([digits_vit()(x) for x, _ in loader])
        tome = torch.cat([fxprune.transform(digits_vit(), ToMe(4))(x) for x, _ in loader])
    assert result.rows[0].error == 0.0
    assert result.rows[3].error == pytest.approx(((tome - dense).norm() / dense.norm()).item(), rel=1e-4)
    assert 0 < result.rows[3].error < 1


def test_rows_agree_with_separate_evaluation(result):
    data = DigitScenes("test", 200, seed=1)
    model = fxprune.transform(digits_vit(), EViT(0.5, (1, 3)))
    accuracy, macs = evaluate(model, torch.utils.data.DataLoader(data, batch_size=50))
    assert accuracy == result.rows[1].accuracy and macs == pytest.approx(result.rows[1].macs)


def test_markdown_table_names_the_measurement(result):
    text = result.markdown()
    assert "| method | top-1 (%) | Δ top-1 | output error | MACs / image | % of dense MACs | speed ratio |" in text
    assert "interleaved runs" in text and "machine: CPU" in text
    assert text.count("\n|") == 6


def test_plot_is_written(result, tmp_path):
    plot(result, tmp_path / "curve.png")
    assert Image.open(tmp_path / "curve.png").size[0] > 300


def _mac_fraction(model, policy):
    the_plan = fxprune.plan(model, policy)
    return the_plan.macs_after / the_plan.macs_before


def test_settings_are_the_closest_to_a_mac_fraction_without_exceeding_it():
    model = digits_vit()
    keep = keep_rate_for(model, EViT, (1, 3), 0.7)
    assert _mac_fraction(model, EViT(keep, (1, 3))) <= 0.7 < _mac_fraction(model, EViT(keep + 0.01, (1, 3)))
    r = tome_r_for(model, 0.7)
    assert _mac_fraction(model, ToMe(r)) <= 0.7 < _mac_fraction(model, ToMe(r - 1))


def _scenes(split: str, count: int) -> torch.Tensor:
    data = DigitScenes(split, count, seed=0)
    return torch.stack([data[i][0] for i in range(count)])


def test_fits_that_share_their_measured_fractions_plan_each_setting_once(monkeypatch):
    from fxprune.tools import search

    planned = []
    plan = search.plan
    monkeypatch.setattr(search, "plan", lambda model, policy, *args, **kwargs: planned.append(policy) or plan(
        model, policy, *args, **kwargs))
    model, fractions = digits_vit(), {}
    family = partial(EViT, layers=(1, 3))
    first = fit_policy(model, family, [0.3, 0.5, 0.7, 0.9], 0.8, fractions=fractions)
    assert list(fractions) == planned and len(set(planned)) == len(planned)
    assert fit_policy(model, family, [0.3, 0.5, 0.7, 0.9], 0.8, fractions=fractions) == first
    assert len(planned) == len(fractions)  # the second fit measured nothing again
    assert fractions[first] == _mac_fraction(model, first)


def test_sweep_covers_every_method_at_each_fraction():
    model, calibration = digits_vit(), _scenes("train", 12)
    policies = sweep_policies(model, (1, 3), fractions=(0.8, 0.6), calibration=calibration)
    assert [type(p) for p in policies[:6]] == [EViT, EViT, TopK, TopK, ToMe, ToMe]
    assert [type(p) for p in policies[-4:]] == [ClusTR] * 4
    assert policies[0].keep_rate > policies[1].keep_rate and policies[4].r < policies[5].r
    assert policies[4].layers is None  # ToMe merges in every block, as in its paper
    samplers = policies[6:-4]  # each ATS setting, then EViT and Top-K at its MACs per image
    assert [type(p) for p in samplers] == [ATS, EViT, TopK] * 3
    starts = [p.layers[0] for p in samplers[::3]]
    assert samplers[::3] == [ats_from(6, start) for start in starts] and starts[-1] == 1  # the last: official
    assert starts[0] > starts[1]  # 80% of the MACs start later than 60%
    for ats, evit, topk in zip(samplers[::3], samplers[1::3], samplers[2::3]):
        fraction = mac_fraction(model, ats, calibration)
        assert _mac_fraction(model, evit) <= fraction < _mac_fraction(model, EViT(evit.keep_rate + 0.01, (1, 3)))
        assert _mac_fraction(model, topk) <= fraction


def test_adaptive_settings_are_fitted_by_their_mean_macs_per_image_on_calibration_images():
    model, calibration = digits_vit(), _scenes("train", 12)
    policy = fit_policy(model, partial(ats_from, 6), range(6), 0.7, calibration=calibration)
    start = policy.layers[0]
    assert mac_fraction(model, policy, calibration) <= 0.7 < mac_fraction(model, ats_from(6, start + 1), calibration)
    assert _mac_fraction(model, policy) > 0.7  # the static layout's MACs would have chosen a later start


def test_macs_of_a_method_that_pads_are_what_each_image_costs_alone():
    data = DigitScenes("test", 24, seed=1)
    images = torch.stack([data[i][0] for i in range(24)])
    policy = ATS(None, (1, 2, 3))
    result = run(digits_vit(), [policy], data, batch_size=24, speed_batch=4, repeats=1, progress=False)
    fast = fxprune.transform(digits_vit(), policy)
    alone = per_image_macs(fast, images)
    assert result.rows[1].macs == pytest.approx(alone)
    assert alone < fxprune.flops(fast, images)  # the padded batch would count its padding


def test_default_layers_follow_evit_for_twelve_blocks():
    import timm

    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)
    assert default_layers(deit) == (3, 6, 9)
    assert default_layers(digits_vit()) == (1, 3, 4)
