from importlib import resources

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import fxprune
from fxprune.tools.bench import evaluate
from fxprune.tools.datasets import DigitScenes
from fxprune.tools.models import DIGITS_VIT_WEIGHTS, digits_vit, digits_vit_relpos


def test_shipped_digits_vit_is_a_timm_vit_with_class_token_and_64_patches():
    model = digits_vit()
    assert isinstance(model, VisionTransformer) and not model.training
    assert model.has_class_token and model.patch_embed.num_patches >= 64 and len(model.blocks) >= 6
    program = fxprune.analyse(model)
    assert program.tokens == 65 and program.class_token and all(b.reducible for b in program.blocks)


def test_shipped_weights_are_small():
    assert len(resources.files("fxprune.tools.weights").joinpath(DIGITS_VIT_WEIGHTS).read_bytes()) < 5e6


def test_shipped_model_is_at_least_95_percent_accurate_on_held_out_digits():
    data = DigitScenes("test", 500, seed=1)
    loader = torch.utils.data.DataLoader(data, batch_size=250)
    accuracy, macs = evaluate(digits_vit(), loader)
    assert accuracy >= 0.95
    assert macs == pytest.approx(fxprune.flops(digits_vit(), torch.zeros(1, 3, 64, 64)))


def test_the_relative_bias_variant_starts_as_the_digits_vit_and_has_position_terms_in_every_block():
    data = DigitScenes("test", 8, seed=1)
    images = torch.stack([data[i][0] for i in range(8)])
    variant = digits_vit_relpos()
    with torch.no_grad():
        torch.testing.assert_close(variant(images), digits_vit()(images), atol=1e-5, rtol=0)
    program = fxprune.analyse(variant)
    assert program.class_token and all(block.position_terms and block.reducible for block in program.blocks)
    assert all(len(block.position_terms) == 1 for block in program.blocks)  # the bias, not the q, k, v biases
