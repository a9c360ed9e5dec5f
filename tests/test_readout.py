import pytest
import timm
import torch
from vits import (
    assert_each_image_gets_what_it_gets_alone,
    assert_same_outputs,
    hand_written_vit,
    image_batch,
    lookout,
    timm_vit,
)

import fxprune
from fxprune.errors import UnsupportedModelError


def _tiny(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=2, **overrides).eval()


def test_a_token_read_alone_is_the_class_token_whatever_its_names():
    program = fxprune.analyse(lookout("summary"))
    assert (program.prefix_tokens, program.class_token) == (1, True)
    assert (program.readout.class_rows, program.readout.patches) == ((0,), "none")


def test_class_scored_methods_rewrite_a_model_with_unusual_names():
    model = lookout("summary")
    assert_same_outputs(fxprune.transform(model, fxprune.EViT(1.0, (1, 2))), model)
    reduced = fxprune.transform(model, fxprune.TopK(0.5, (1, 2)))
    assert reduced.fxprune_plan.macs_after < reduced.fxprune_plan.macs_before


def test_a_mean_over_every_token_has_no_class_token():
    program = fxprune.analyse(lookout("mean"))
    assert (program.prefix_tokens, program.class_token, program.readout.patches) == (1, False, "pooled")
    with pytest.raises(UnsupportedModelError, match="has no class token"):
        fxprune.transform(lookout("mean"), fxprune.AdaViT(0.7))


def test_a_dense_output_keeps_its_class_token_and_says_every_patch_row_is_read():
    program = fxprune.analyse(lookout("all"))
    assert (program.class_token, program.readout.class_rows, program.readout.patches) == (True, (0,), "dense")


class _GridHead(torch.nn.Module):
    """A timm backbone whose patch tokens a convolution reads as their 4×4 grid, then a linear classifier."""

    def __init__(self):
        super().__init__()
        self.backbone = _tiny("vit_tiny_patch16_224", num_classes=0, global_pool="")
        self.conv = torch.nn.Conv2d(192, 8, 3, padding=1)
        self.head = torch.nn.Linear(8 * 16, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.backbone(images)[:, 1:].transpose(1, 2).reshape(images.shape[0], 192, 4, 4)
        return self.head(self.conv(grid).flatten(1))


def test_patch_rows_a_convolution_reads_as_their_grid_are_ordered_and_get_their_layout_back():
    model = _GridHead().eval()
    assert fxprune.analyse(model).readout.patches == "ordered"  # every patch row meets every output, in its place
    reduced = fxprune.transform(model, fxprune.TopK(0.5, (1,)))  # before: refused (the grid's reshape failed)
    assert any("in its place" in note and "put back" in note for note in reduced.fxprune_plan.notes)
    assert_each_image_gets_what_it_gets_alone(reduced, image_batch(model))
    assert_same_outputs(fxprune.transform(model, fxprune.TopK(1.0, (1,))), model)
    with pytest.raises(fxprune.PolicyError, match="reads the final tokens in their places"):
        fxprune.transform(model, fxprune.TopK(0.5, (1,)), restore=False)


def test_a_class_token_that_the_output_does_not_read_is_no_class_token():
    program = fxprune.analyse(_tiny("vit_tiny_patch16_224", global_pool="avg"))
    assert (program.prefix_tokens, program.class_token, program.readout.patches) == (1, False, "pooled")


def test_distilled_deit_reads_two_prefix_rows_and_scores_read_the_first():
    program = fxprune.analyse(_tiny("deit_tiny_distilled_patch16_224"))
    assert (program.prefix_tokens, program.class_token, program.readout.class_rows) == (2, True, (0, 1))


def test_register_tokens_that_the_output_ignores_are_not_class_rows():
    program = fxprune.analyse(hand_written_vit(registers=3))
    assert (program.class_token, program.readout.class_rows) == (True, (0,))


def test_a_zero_classifier_still_shows_which_rows_it_reads():
    model = timm_vit("vit_tiny_patch16_224")
    torch.nn.init.zeros_(model.head.weight)
    assert fxprune.analyse(model).readout.class_rows == (0,)


def test_the_analysis_says_what_the_output_reads_and_which_score_each_model_gets():
    text = str(fxprune.analyse(lookout("summary")))
    assert "readout: the output reads prefix row(s) 0 alone, no patch row" in text
    assert "token scores (EViT, Top-K, ATS): class-token attention (row 0)" in text
    text = str(fxprune.analyse(lookout("mean")))
    assert "token scores (EViT, Top-K, ATS): attention received, averaged over queries and heads" in text


def test_finding_the_class_token_leaves_the_model_unchanged():
    model = lookout("summary")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = image_batch(model)
    with torch.no_grad():
        expected = model(x)
    fxprune.analyse(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), expected)
