import copy

import pytest
import timm
import torch
import torchvision
from vits import ALL_MODELS, hf_clip, hf_vit, image_batch, logits, saved_and_loaded, timm_vit, torchvision_vit

import fxprune
from fxprune import ATS, ClusTR, DynamicViT, EViT, ToMe, TopK, UnsupportedModelError


def test_transform_leaves_the_users_model_untouched():
    model = timm_vit("deit3_small_patch16_224")
    x = image_batch(model)
    before_out = model(x)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    fxprune.transform(model, EViT(0.5, (1, 2)))
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_state.items())
    torch.testing.assert_close(model(x), before_out, atol=0, rtol=0)


def test_a_transformed_model_keeps_what_describes_the_model_but_not_its_code_flags():
    model = timm_vit("deit_small_patch16_224", dynamic_img_size=True)
    gm = fxprune.transform(model, EViT(0.5, (1,)))  # before: no pretrained_cfg, so timm's default preprocessing
    for kept in (gm, copy.deepcopy(gm), saved_and_loaded(gm)):
        assert kept.pretrained_cfg is not None and kept.num_classes == model.num_classes
        assert timm.data.resolve_data_config({}, model=kept) == timm.data.resolve_data_config({}, model=model)
        assert not hasattr(kept, "dynamic_img_size")  # the graph is of the captured image size
    labelled = hf_vit()
    assert fxprune.transform(labelled, EViT(0.5, (1,))).config is labelled.config  # its labels, shared


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_state_dict_of_a_transformed_model_loads_into_the_original_and_back(name):
    model = ALL_MODELS[name]()
    gm = fxprune.transform(model, TopK(0.5, (1,)))
    model.load_state_dict(gm.state_dict(), strict=True)
    gm.load_state_dict(model.state_dict(), strict=True)


def test_weights_are_shared_unless_copy_is_asked_for():
    model = timm_vit("deit_small_patch16_224")
    shared = fxprune.transform(model, EViT(0.5, (1,)))
    copied = fxprune.transform(model, EViT(0.5, (1,)), copy_weights=True)
    assert shared.get_parameter("head.weight") is model.head.weight
    assert copied.get_parameter("head.weight") is not model.head.weight


def test_a_model_transformed_in_training_mode_evaluates_as_the_original_and_trains_with_its_dropout():
    model = timm_vit("deit_small_patch16_224", depth=3, attn_drop_rate=0.5).train()  # SDPA's dropout_p reads the mode
    x = image_batch(model)
    gm = fxprune.transform(model, EViT(1.0, (1, 2)))
    assert gm.training and model.training
    assert "dropout_p = 0.5" in gm.train_code and "dropout_p = 0.5" not in gm.code
    assert any("differs in training mode" in note for note in gm.fxprune_plan.notes)
    with torch.no_grad():
        assert not torch.equal(gm(x), gm(x))  # training mode: its dropout
        gm.eval()
        model.eval()
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=0)


def _same_in_training(gm: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor) -> None:
    """Assert that ``gm`` and ``model`` in training mode give ``x`` the same output from the same random seed."""
    gm.train()
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(gm(x), expected, atol=1e-5, rtol=0)


def test_a_model_with_dropout_transformed_in_evaluation_mode_trains_with_it():
    model = timm_vit("deit_small_patch16_224", depth=3, attn_drop_rate=0.5).eval()
    x = image_batch(model)
    gm = fxprune.transform(model, EViT(1.0, (1, 2)))
    assert not gm.training and "dropout_p = 0.5" in gm.train_code
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=0)
    _same_in_training(gm, model, x)  # the same attention weights dropped


def test_drop_path_in_a_rewritten_training_graph_scales_the_paths_it_keeps():
    model = timm_vit("deit_small_patch16_224", depth=3, drop_path_rate=0.5).train()
    gm = fxprune.transform(model, EViT(1.0, (1, 2)))
    assert ".div_(" in gm.train_code  # in place, its result unused: not dead code
    _same_in_training(gm, model, image_batch(model))


def test_multihead_attention_keeps_its_attention_dropout_in_training_mode():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, attention_dropout=0.5).train()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at zero: all logits 0
    x = image_batch(model)
    gm = fxprune.transform(model, EViT(1.0, (1, 2)))
    assert "dropout_p = 0.5" in gm.train_code and "dropout_p" not in gm.code
    _same_in_training(gm, model, x)  # the same attention weights dropped


def test_code_only_training_runs_is_kept_for_the_training_graph():
    model = timm_vit("deit_small_patch16_224", depth=3, patch_drop_rate=0.5).train()  # skipped in evaluation mode
    x = image_batch(model)
    gm = fxprune.transform(model, EViT(1.0, (1, 2)))
    assert "torch.argsort(" in gm.train_code and "argsort" not in gm.code  # patch dropout's random order
    with torch.no_grad():
        assert not torch.equal(gm(x), gm(x))
        gm.eval()
        model.eval()
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=0)


def test_a_model_whose_code_does_not_branch_on_its_mode_keeps_one_graph_in_training_mode():
    gm = fxprune.transform(timm_vit("deit_small_patch16_224", depth=3).train(), EViT(0.7, (1,)))
    assert gm.training and not hasattr(gm, "train_graph")
    assert not any("differs in training mode" in note for note in gm.fxprune_plan.notes)


def test_a_learned_method_trains_with_the_models_training_code_transformed_in_evaluation_mode():
    model = timm_vit("deit_small_patch16_224", depth=3, attn_drop_rate=0.5)
    gm = fxprune.transform(model, fxprune.DynamicViT(0.7, (1,)))
    assert not gm.training
    assert "dropout_p = 0.5" in gm.train_code and "dropout_p = 0.5" not in gm.code


def test_verbose_prints_the_plan(capsys):
    fxprune.transform(timm_vit("deit_small_patch16_224"), EViT(0.5, (1,)), verbose=True)
    assert "fxprune plan for VisionTransformer" in capsys.readouterr().out


def test_example_inputs_set_the_input_size_planned_for():
    model = timm_vit("deit_small_patch16_224", dynamic_img_size=True)
    gm = fxprune.transform(model, EViT(0.5, (1,)), example_inputs=(torch.randn(2, 3, 48, 48),))
    assert gm.fxprune_plan.rows[0].tokens_in == 37
    assert gm(torch.randn(2, 3, 48, 48)).shape == (2, 1000)
    alone = fxprune.transform(model, EViT(0.5, (1,)), example_inputs=torch.randn(2, 3, 48, 48))  # the one input
    assert alone.fxprune_plan.rows[0].tokens_in == 37  # before: a tensor was taken as B inputs, "found no attention"


@pytest.mark.parametrize(
    "first, tokens",
    [
        (EViT(0.7, (1,)), [(17, 17), (17, 14), (14, 8), (8, 8)]),  # selects after the residual add
        (TopK(0.7, (1,)), [(17, 17), (17, 13), (13, 7), (7, 7)]),  # selects inside the attention
    ],
    ids=["evit", "topk"],
)
def test_transforming_a_transformed_model_equals_composing_the_policies(first, tokens):
    model = timm_vit("deit_small_patch16_224")
    stacked = fxprune.transform(fxprune.transform(model, first), TopK(0.5, (2,)))
    composed = fxprune.transform(model, fxprune.Compose([first, TopK(0.5, (2,))]))
    rows = stacked.fxprune_plan.rows
    assert [(r.tokens_in, r.tokens_out) for r in rows] == tokens
    assert rows[1].action == "unchanged (reduced by an earlier fxprune transform)"
    x = image_batch(model)
    torch.testing.assert_close(stacked(x), composed(x), atol=0, rtol=0)
    assert set(stacked.state_dict()) == set(model.state_dict())


@pytest.mark.parametrize("factory", [hf_vit, torchvision_vit], ids=["hf", "torchvision"])
def test_a_transformed_model_keeps_its_class_token_for_the_next_transform(factory):
    model = factory()  # no timm attribute to fall back on: the class token is found by what the output reads
    first = fxprune.transform(model, EViT(0.7, (1,)))
    assert fxprune.analyse(first).class_token  # before: its reduced rows were not found, EViT scored otherwise
    stacked = fxprune.transform(first, EViT(0.7, (2,)))
    composed = fxprune.transform(model, fxprune.Compose([EViT(0.7, (1,)), EViT(0.7, (2,))]))
    x = image_batch(model)
    torch.testing.assert_close(logits(stacked(x)), logits(composed(x)), atol=0, rtol=0)


@pytest.mark.parametrize("first, second", [(TopK(0.7, (2,)), EViT(0.7, (1,))), (EViT(0.7, (2,)), ClusTR(4, (1,)))],
                         ids=["evit-before-topk", "clustr-before-evit"])
def test_a_method_before_an_earlier_transforms_block_equals_composing_the_policies(first, second):
    model = timm_vit("deit_small_patch16_224")
    stacked = fxprune.transform(fxprune.transform(model, first), second)
    composed = fxprune.transform(model, fxprune.Compose([first, second]))
    x = image_batch(model)
    torch.testing.assert_close(stacked(x), composed(x), atol=0, rtol=0)


def test_the_plan_says_which_block_an_earlier_clustered_attention_leaves_out():
    model = timm_vit("deit_small_patch16_224")
    stacked = fxprune.transform(fxprune.transform(model, ClusTR(4, (2,))), EViT(0.7, (1,)))
    assert any(note.startswith("block 2 is not listed: an earlier fxprune transform replaced its attention")
               for note in stacked.fxprune_plan.notes)  # before: the plan's rows skipped it silently
    composed = fxprune.transform(model, fxprune.Compose([ClusTR(4, (2,)), EViT(0.7, (1,))]))
    x = image_batch(model)
    torch.testing.assert_close(stacked(x), composed(x), atol=0, rtol=0)


@pytest.mark.parametrize(
    "first, second, message",
    [
        (EViT(0.7, (1,)), ToMe(2, (1,)), r"block 1 \(blocks\.1\): an earlier fxprune transform rewrote it"),
        (EViT(0.7, (2,)), ToMe(2, (1,)), r"tome r 2 at block 1 tells every later attention .* earlier fxprune "
                                         r"transform rewrote block 2"),
        (ClusTR(4, (1,)), EViT(0.7, (2,)), r"block 2: an earlier fxprune transform replaced the attention of block 1"),
        (DynamicViT(0.7, (2,)), EViT(0.7, (1,)), r"\(dynamicvit keep 0\.7 \(untrained\)\) with a training graph"),
    ],
    ids=["same-block", "sizes-through-an-earlier-block", "after-replaced-attention", "learned"],
)
def test_transforming_a_transformed_model_where_the_earlier_rewrite_is_in_the_way_is_refused(first, second, message):
    transformed = fxprune.transform(timm_vit("deit_small_patch16_224"), first)  # before: crashes, or block 3 rewritten
    with pytest.raises(UnsupportedModelError, match=message + r".*fxprune\.Compose"):
        fxprune.transform(transformed, second)


def test_a_refusal_of_every_block_names_the_attention_on_another_input_and_the_tower_to_transform():
    clip = hf_clip()  # input_ids first: its text stream's blocks are refused, its vision tower is on pixel_values
    inputs = {"input_ids": torch.randint(2, 100, (2, 7)), "pixel_values": torch.randn(2, 3, 32, 32)}
    with pytest.raises(UnsupportedModelError, match=r"No block of CLIPModel is reducible\. Its attention on another "
                       r"input is left as is: attention .* in vision_model\.encoder\.layers\.0\.self_attn \(computed "
                       r"from the input pixel_values, not input_ids, whose token stream fxprune reduces: transform "
                       r"vision_model on its own, model\.vision_model = fxprune\.transform\(model\.vision_model, "
                       r"policy\), to reduce its tokens\)\.$"):
        fxprune.transform(clip, EViT(0.5, (1,)), inputs)


def test_a_transformed_model_saved_and_loaded_is_transformed_again_as_the_one_saved():
    model = timm_vit("deit_small_patch16_224")
    x = image_batch(model)
    loaded = saved_and_loaded(fxprune.transform(model, EViT(0.7, (1,))))
    composed = fxprune.transform(model, fxprune.Compose([EViT(0.7, (1,)), TopK(0.7, (2,))]))
    torch.testing.assert_close(fxprune.transform(loaded, TopK(0.7, (2,)), x)(x), composed(x), rtol=0, atol=0)
    sized = saved_and_loaded(fxprune.transform(model, ToMe(2, (1,))))  # before: a TraceError in its own forward
    with pytest.raises(UnsupportedModelError, match=r"block 3 .*earlier fxprune transform.*fxprune\.Compose"):
        fxprune.transform(sized, EViT(0.7, (3,)), x)
    del sized.meta["fxprune_trace"]  # as a file saved without the record of its rewrites loads
    with pytest.raises(UnsupportedModelError, match=r"VisionTransformer was transformed by fxprune \(tome r 2\) and "
                       r"saved and loaded since: torch\.save kept its code, not the record of what that transform "
                       r"rewrote.*fxprune\.Compose"):
        fxprune.transform(sized, EViT(0.7, (3,)), x)


@pytest.mark.parametrize("restore", [True, False], ids=["layout-restored", "positions-returned"])
def test_transforming_a_model_whose_dense_output_follows_its_rows_is_refused(restore):
    dense = timm_vit("deit_small_patch16_224", num_classes=0, global_pool="")
    transformed = fxprune.transform(dense, EViT(0.7, (1,)), restore=restore)
    message = r"follows the rows its blocks keep to an output that reads every token.*fxprune\.Compose"
    with pytest.raises(UnsupportedModelError, match=message):  # before: refused as channel attention
        fxprune.transform(transformed, EViT(0.7, (2,)), restore=restore)


@pytest.mark.parametrize("first", [ATS(9, (1,)), ToMe(2, (1,))], ids=["ats", "tome"])
def test_blocks_after_an_earlier_transforms_sized_stream_are_refused_with_the_way_out(first):
    transformed = fxprune.transform(timm_vit("deit_small_patch16_224"), first)
    with pytest.raises(UnsupportedModelError, match=r"block 3 .*earlier fxprune transform.*fxprune\.Compose"):
        fxprune.transform(transformed, EViT(0.7, (3,)))


@pytest.mark.parametrize(
    "factory, inputs, message",
    [
        (
            lambda: timm.create_model(
                "swin_tiny_patch4_window7_224", img_size=56, embed_dim=24, depths=(1, 1), num_heads=(2, 4)
            ),
            None,
            r"block 1 \(layers\.1\.blocks\.0\): the stream entering it is \(2, 7, 7, 48\), "
            r"not a \[B, N, C\] token sequence",
        ),
        (lambda: torchvision.models.resnet18(), (torch.randn(2, 3, 64, 64),), "found no attention in ResNet"),
    ],
    ids=["swin-windows", "resnet"],
)
def test_models_it_would_compute_wrong_numbers_for_are_refused(factory, inputs, message):
    with pytest.raises(fxprune.UnsupportedModelError, match=message):
        fxprune.transform(factory().eval(), EViT(0.5, (1,)), example_inputs=inputs)
