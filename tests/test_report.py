import pytest
from vits import timm_vit

import fxprune
from fxprune import EViT, FxPruneError


def test_report_shows_plan_capture_and_inserted_nodes():
    gm = fxprune.transform(timm_vit("deit_small_patch16_224"), EViT(0.5, (1, 2)))
    text = str(fxprune.report(gm))
    assert "fxprune plan for VisionTransformer" in text
    assert "MACs per image:" in text
    assert "captured VisionTransformer on inputs x [2, 3, 32, 32]" in text
    assert "inserted nodes (4):" in text
    assert "blocks_1_class_attn = fxprune.ops.scoring.class_attention(" in text
    assert "blocks_2_evit = fxprune.ops.selection.evit_select(" in text


def test_generated_code_calls_named_fxprune_functions():
    gm = fxprune.transform(timm_vit("deit_small_patch16_224"), EViT(0.5, (1,)))
    assert "blocks_1_class_attn = fxprune_ops_scoring_class_attention(" in gm.code
    assert "blocks_1_evit = fxprune_ops_selection_evit_select(" in gm.code


def test_report_needs_a_transformed_model():
    with pytest.raises(FxPruneError, match="expects a model returned by fxprune.transform"):
        fxprune.report(fxprune.trace(timm_vit("deit_small_patch16_224")))
