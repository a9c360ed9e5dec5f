import pytest
import timm
import torch
import torchvision
from vits import (
    ALL_MODELS,
    PREFIX_TOKENS,
    TIMM_SMALL,
    hand_written_vit,
    hf_vit,
    timm_vit,
    torchvision_vit,
    with_explicit_softmax,
    with_position_bias_in_block_3,
)

import fxprune
from fxprune.errors import UnsupportedModelError


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_every_attention_block_is_found_and_reducible(name):
    program = fxprune.analyse(ALL_MODELS[name]())
    assert len(program.blocks) == 4
    assert all(b.reducible for b in program.blocks)
    assert program.class_token
    assert all(b.tokens == program.tokens for b in program.blocks)
    assert all(b.attention.queries == b.attention.keys == program.tokens for b in program.blocks)


@pytest.mark.parametrize("name", sorted(TIMM_SMALL))
def test_prefix_tokens_of_timm_models(name):
    assert fxprune.analyse(timm_vit(name)).prefix_tokens == PREFIX_TOKENS[name]


@pytest.mark.parametrize("factory", [torchvision_vit, hf_vit, hand_written_vit])
def test_prefix_token_is_inferred_from_the_sequence_without_timm_attributes(factory):
    program = fxprune.analyse(factory())
    assert (program.prefix_tokens, program.class_token) == (1, True)


def test_register_tokens_count_as_prefix_in_a_hand_written_model():
    program = fxprune.analyse(hand_written_vit(registers=3))
    assert (program.prefix_tokens, program.class_token, program.tokens) == (4, True, 20)


def test_model_without_class_token_is_recognised():
    program = fxprune.analyse(timm_vit("vit_tiny_patch16_224", class_token=False, global_pool="avg"))
    assert (program.prefix_tokens, program.class_token) == (0, False)


@pytest.mark.parametrize(
    "factory, first_block",
    [
        (lambda: timm_vit("deit_small_patch16_224"), "blocks.0"),
        (torchvision_vit, "encoder.layers.encoder_layer_0"),
        (hf_vit, "vit.layers.0"),
        (hand_written_vit, "stages.0"),
    ],
)
def test_blocks_are_named_after_the_models_modules(factory, first_block):
    assert fxprune.analyse(factory()).blocks[0].name == first_block


def test_explicit_softmax_attention_is_a_site_with_its_heads():
    model = with_explicit_softmax(timm_vit("deit_small_patch16_224"))
    for program in (fxprune.analyse(model), fxprune.analyse(hand_written_vit())):
        sites = [b.attention for b in program.blocks]
        assert {s.kind for s in sites} == {"softmax"}
        assert all(s.k is not None and s.num_heads in (6, 3) for s in sites)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("beit_base_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4)),
        ("eva02_tiny_patch14_224", dict(img_size=56, depth=2)),
    ],
)
def test_position_dependent_attention_is_refused_with_the_table_named(name, kwargs):
    program = fxprune.analyse(timm.create_model(name, pretrained=False, **kwargs))
    for block in program.blocks:
        assert not block.reducible and block.needs_all_tokens
        assert "position-dependent" in block.refusal


def test_windowed_attention_is_refused():
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=24, depths=(1, 1), num_heads=(2, 4)
    )
    program = fxprune.analyse(model)
    assert len(program.blocks) == 2
    assert all(not b.reducible and "not a [B, N, C] token sequence" in b.refusal for b in program.blocks)


def test_class_attention_and_unrecognised_softmax_are_reported():
    program = fxprune.analyse(timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, depth=2))
    assert all("class attention" in b.refusal for b in program.blocks)
    assert len(program.unrecognised) == 2  # CaiT's talking-heads attention mixes heads between matmul and softmax
    assert "not recognised as attention" in str(program)


def test_model_without_attention_raises():
    with pytest.raises(UnsupportedModelError, match="found no attention in ResNet"):
        fxprune.analyse(torchvision.models.resnet18(), (torch.randn(2, 3, 64, 64),))


def test_summary_lists_every_block_with_its_status():
    text = str(fxprune.analyse(timm_vit("deit_small_distilled_patch16_224")))
    assert "4 attention blocks, 18 tokens × 384 channels (2 prefix token(s), class token: yes)" in text
    assert text.count("reducible") == 4


def test_the_analysis_lists_the_position_terms_of_each_block():
    program = fxprune.analyse(with_position_bias_in_block_3())
    assert [b.position_terms for b in program.blocks] == [(), (), (), ("stages.3.mix.bias [3, 17, 17]",)]
    assert "stages.3.mix.bias  not reducible" in str(program)
