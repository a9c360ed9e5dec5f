"""Guards at run time (``fxprune.passes.guards``): a transformed model raises, naming the model's code, on an input
for which that code would take another branch or size than on the inputs it was captured with."""

import math

import pytest
import timm
import torch
from vits import HandWrittenViT, Stage, assert_compiles_once

import fxprune
from fxprune import CapturedShapeError


def _resampling_vit() -> torch.nn.Module:
    """A ViT that resamples its position embeddings to the input's grid (timm's ``dynamic_img_size``)."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                             num_classes=5, dynamic_img_size=True).eval()


def test_an_input_of_another_size_raises_naming_the_branch_the_capture_took():
    model = _resampling_vit()
    reduced = fxprune.transform(model, fxprune.EViT(0.5, (1, 2)))  # captured at 32², 16 patches
    with torch.no_grad():
        reduced(torch.randn(1, 3, 32, 32))
        with pytest.raises(CapturedShapeError, match=r"timm/layers/pos_embed\.py:\d+ .* took a branch on a shape when "
                           r"captured on inputs \[2, 3, 32, 32\] \(\w+ was True\); for this input it is False.* "
                           r"example_inputs"):  # before: a RuntimeError of mismatched sizes in the add
            reduced(torch.randn(2, 3, 48, 48))


def test_transformed_again_at_that_size_the_model_is_reproduced_there():
    model = _resampling_vit()
    x = torch.randn(2, 3, 48, 48)
    again = fxprune.transform(model, fxprune.EViT(1.0, (1, 2)), example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=1e-5, rtol=0)


class _ScalesByTokenCount(Stage):
    def forward(self, tokens):
        return super().forward(tokens / math.sqrt(float(tokens.shape[1])))  # a size made a Python number


class _AnySize(HandWrittenViT):
    """The hand-written ViT without position embeddings, so it takes any image size."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.to_patches(images).flatten(2).transpose(1, 2)
        return torch.cat([self.class_embedding.expand(patches.shape[0], -1, -1), patches], dim=1)


def test_an_input_that_changes_a_size_made_a_python_number_raises_saying_so():
    torch.manual_seed(0)
    model = _AnySize().eval()
    model.stages[1] = _ScalesByTokenCount(48, 3)
    reduced = fxprune.transform(model, fxprune.EViT(0.5, (2,)))
    with torch.no_grad():
        assert reduced(torch.randn(3, 3, 32, 32)).shape == (3, 7)
        with pytest.raises(CapturedShapeError, match=r"made a size a Python number when captured on inputs "
                           r"\[2, 3, 32, 32\] \(\w+ was 17\.0\); for this input it is 26\.0"):
            reduced(torch.randn(3, 3, 40, 40))


def test_one_image_without_its_batch_axis_raises_saying_how_to_pass_it():
    reduced = fxprune.transform(_resampling_vit(), fxprune.EViT(0.5, (1, 2)))
    expected = (r"VisionTransformer was transformed for x of 4 dimensions \(captured as \[2, 3, 32, 32\]\), and this x "
                r"has 3: \[3, 32, 32\]\. Pass it as captured \(one image: x\[None\]")
    with torch.no_grad(), pytest.raises(CapturedShapeError, match=expected):  # before: an IndexError
        reduced(torch.randn(3, 32, 32))


def test_the_checks_compile_into_one_graph():
    model = _resampling_vit()
    assert_compiles_once(fxprune.transform(model, fxprune.EViT(0.5, (1, 2))), model)


def test_compiled_an_input_of_another_size_raises_with_the_same_reason():
    model = _resampling_vit()
    gm = fxprune.transform(model, fxprune.EViT(0.5, (1, 2)))
    lowered = fxprune.lower(gm, backend="aot_eager")  # dynamo and AOT autograd, where the guard is traced
    with torch.no_grad():
        lowered(torch.randn(2, 3, 32, 32))
        with pytest.raises(CapturedShapeError, match=r"took a branch on a shape when captured on inputs \[2, 3, 32, "
                           r"32\]"):  # before: dynamo's Unsupported, and before that "BooleanAtom not allowed …"
            lowered(torch.randn(2, 3, 48, 48))
        with pytest.raises(CapturedShapeError, match=r"transformed for x of 4 dimensions"):
            lowered(torch.randn(3, 32, 32))
    torch._dynamo.reset()
