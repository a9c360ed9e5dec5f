"""A captured or transformed model takes its model's other arguments at the values it was captured with, and
refuses others naming the argument. Budget: about 10 s of the suite."""

import copy

import pytest
import torch
from vits import hand_written_vit, hf_clip, hf_vit, saved_and_loaded, timm_vit

import fxprune
from fxprune import CapturedArgumentError, EViT


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_a_hugging_face_model_takes_its_output_switches_at_the_values_it_was_captured_with():
    fast, x = fxprune.transform(hf_vit(depth=2), EViT(0.5, (1,))), _images()
    expected = fast(x).logits
    switches = dict(return_dict=True, output_attentions=False, output_hidden_states=False,
                    interpolate_pos_encoding=None, labels=None)
    torch.testing.assert_close(fast(x, **switches).logits, expected, rtol=0, atol=0)  # before: a TypeError
    torch.testing.assert_close(fast(pixel_values=x, return_dict=None).logits, expected, rtol=0, atol=0)
    with pytest.raises(CapturedArgumentError, match=r"ViTForImageClassification was captured with "
                       r"output_hidden_states=False; this call passes output_hidden_states=True, for which the model "
                       r"runs other code than its graph has\. Capture it with that argument: example_inputs="
                       r"\{'pixel_values': …, 'output_hidden_states': …\}"):
        fast(x, output_hidden_states=True)
    with pytest.raises(TypeError, match=r"captured with labels=None; this call passes labels=a tensor of shape \[2\]"):
        fast(x, labels=torch.tensor([1, 2]))


def test_an_argument_fixed_for_the_capture_is_taken_at_that_value_only():
    model, x = hf_vit(depth=2), _images()
    fast = fxprune.transform(model, EViT(0.5, (1,)), {"pixel_values": x, "output_hidden_states": True})
    assert len(fast(x, output_hidden_states=True).hidden_states) == 3
    with pytest.raises(CapturedArgumentError, match=r"captured with output_hidden_states=True \(fixed for the "
                       r"capture\); this call passes output_hidden_states=False"):
        fast(x, output_hidden_states=False)


def test_a_transformed_tower_replaces_the_one_its_parent_calls_with_its_full_signature():
    clip = hf_clip()
    ids, x = torch.randint(2, 100, (2, 7), generator=torch.Generator().manual_seed(2)), _images()
    reduced = fxprune.transform(clip.vision_model, EViT(0.5, (1,)), {"pixel_values": x})
    clip.vision_model = reduced  # CLIPModel calls it with interpolate_pos_encoding= and return_dict=
    output = clip(input_ids=ids, pixel_values=x)
    torch.testing.assert_close(output.vision_model_output.last_hidden_state, reduced(x).last_hidden_state)


def test_the_other_arguments_are_kept_by_copies_saved_models_and_training_graphs():
    model, x = hf_vit(depth=2), _images()
    for fast in (fxprune.transform(model, EViT(0.5, (1,))), fxprune.transform(model, fxprune.AdaViT(0.5)),
                 fxprune.trace(model)):
        for copied in (copy.deepcopy(fast), saved_and_loaded(fast)):
            torch.testing.assert_close(copied(x, return_dict=True).logits, fast(x).logits, rtol=0, atol=0)
            with pytest.raises(CapturedArgumentError, match="output_attentions=True"):
                copied(x, output_attentions=True)


def test_an_argument_the_forward_does_not_take_is_refused_naming_what_the_graph_takes():
    fast = fxprune.transform(hand_written_vit(), EViT(0.5, (1,)))
    with pytest.raises(CapturedArgumentError, match=r"the captured HandWrittenViT takes no argument 'scale': its "
                       r"graph takes images$"):
        fast(_images(), scale=2)
    with pytest.raises(CapturedArgumentError, match=r"HandWrittenViT.forward takes 1 positional argument\(s\) "
                       r"\(images\); this call gives 2"):
        fast(_images(), _images())


def test_a_method_of_the_model_the_graph_does_not_have_is_said_to_be_left_out_and_what_to_do():
    model = timm_vit("vit_tiny_patch16_224", depth=2)
    for fast in (fxprune.transform(model, EViT(0.5, (1,))), fxprune.transform(model, fxprune.AdaViT(0.5))):
        for graph in (fast, copy.deepcopy(fast), saved_and_loaded(fast), copy.deepcopy(saved_and_loaded(fast))):
            with pytest.raises(AttributeError, match=r"VisionTransformer.forward_features is not kept: a model fxprune "
                               r"captured or transformed is a graph of the model's forward alone.*num_classes=0, "
                               r"global_pool=''"):  # before: 'VisionTransformer' object has no attribute …
                _ = graph.forward_features
            with pytest.raises(AttributeError, match=r"object has no attribute 'anything_else'$"):
                _ = graph.anything_else
            assert graph.blocks.get_submodule("0") is graph.get_submodule("blocks.0")  # found as before
