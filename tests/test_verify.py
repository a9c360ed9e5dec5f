import math

import pytest
import torch
from vits import (
    HandWrittenViT,
    Stage,
    assert_each_image_gets_what_it_gets_alone,
    assert_same_outputs,
    image_batch,
    rows_counting_video,
)

import fxprune
from fxprune import EViT, UnsupportedModelError


class _SlicesLiteralTokens(HandWrittenViT):
    def forward(self, images):
        tokens = self.embed(images)
        for stage in self.stages:
            tokens = stage(tokens)
        return self.classifier(self.final_norm(tokens)[:, 1:17].mean(1))  # 16 patches, written as literals


class _BranchesOnTokenCount(Stage):
    def forward(self, tokens):
        if tokens.shape[1] == 17:
            tokens = tokens * 1.5
        return super().forward(tokens)


class _ScalesByTokenCount(Stage):
    def forward(self, tokens):
        return super().forward(tokens / math.sqrt(float(tokens.shape[1])))  # a size made a Python number


class _ReshapesToLiteralTokens(Stage):
    def forward(self, tokens):
        return super().forward(tokens.reshape(tokens.shape[0], 17, -1))


def _model(cls=HandWrittenViT, stage=None):
    torch.manual_seed(0)
    model = cls().eval()
    if stage is not None:
        model.stages[2] = stage(48, 3)
    return model


def test_literal_token_count_downstream_is_refused_naming_the_node():
    with pytest.raises(UnsupportedModelError, match=r"uses the literal 17, the token count before block 1"):
        fxprune.transform(_model(_SlicesLiteralTokens), EViT(0.5, (1,)))


def test_branch_taken_on_the_token_count_is_refused():
    model = _model(stage=_BranchesOnTokenCount)
    assert fxprune.trace(model).meta["fxprune_trace"].guards
    with pytest.raises(UnsupportedModelError, match="took a branch on a shape at capture"):
        fxprune.transform(model, EViT(0.5, (1,)))


def test_a_token_count_made_a_python_number_is_traced_and_refused_when_a_rewrite_changes_it():
    model = _model(stage=_ScalesByTokenCount)  # before: stages.2 kept whole (float() of a proxy), its attention unseen
    assert [n for n, _ in fxprune.trace(model).meta["fxprune_trace"].leaves] == []
    assert_same_outputs(fxprune.transform(model, EViT(1.0, (2,))), model)
    with pytest.raises(UnsupportedModelError, match=r"made a size a Python number at capture \(\w+ was 17.0\).* it is "
                       r"10.0"):  # the class token, 8 kept patches and EViT's fused token
        fxprune.transform(model, EViT(0.5, (1,)))


def test_shape_failure_after_rewrite_is_refused_naming_the_module():
    with pytest.raises(UnsupportedModelError, match=r"in stages\.2 fails on a batch of 3: RuntimeError"):
        fxprune.transform(_model(stage=_ReshapesToLiteralTokens), EViT(0.5, (1,)))


def test_a_fast_plan_still_checks_the_rewrite_at_the_captured_batch_size():
    with pytest.raises(UnsupportedModelError, match=r"in stages\.2 fails on a batch of 2: RuntimeError"):
        fxprune.plan(_model(stage=_ReshapesToLiteralTokens), EViT(0.5, (1,)), fast=True)


def test_the_same_models_are_fine_when_reduction_comes_after_the_problem():
    for model in (_model(stage=_BranchesOnTokenCount), _model(stage=_ReshapesToLiteralTokens),
                  _model(stage=_ScalesByTokenCount)):
        gm = fxprune.transform(model, EViT(0.5, (3,)))
        x = torch.randn(2, 3, 32, 32)
        assert gm(x).shape == (2, 7)


def test_a_head_size_equal_to_the_token_count_is_not_taken_for_it():
    from transformers import SiglipConfig, SiglipForImageClassification

    # 16 patch tokens and heads of 16 channels: view(B, N, -1, 16) before SDPA and reshape(B, -1, q.shape[2],
    # v.shape[-1]) after it, in every block; the input size is only in the vision config
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                  intermediate_size=96)
    model = SiglipForImageClassification(SiglipConfig(vision_config=vision, num_labels=10)).eval()
    gm = fxprune.transform(model, fxprune.TopK(0.6, (1, 2)))
    assert [row.tokens_out for row in gm.fxprune_plan.rows] == [16, 10, 6]
    assert_each_image_gets_what_it_gets_alone(gm, image_batch(model, batch=3))
    assert_same_outputs(fxprune.transform(model, EViT(1.0, (1, 2))), model)  # every size as before: nothing to refuse


def test_a_position_table_laid_out_for_fewer_positions_than_the_dense_model_is_refused(monkeypatch):
    from fxprune.passes import positions

    monkeypatch.setattr(positions, "_count_every_token", lambda *args: None)  # V-JEPA 2's tables then follow the rows
    with pytest.raises(UnsupportedModelError, match=r"the position table \w+ .* is laid out for \d+ positions where "
                       "the dense model has 72"):  # before: transformed, and its run failed on an index out of range
        fxprune.transform(rows_counting_video(), fxprune.TopK(0.6, (1, 2)))
