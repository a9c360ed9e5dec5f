"""Position-dependent attention after a reduction (relative position bias, rotary tables): every remaining row is
attended with its own position's terms, so a reduced model equals the dense model in which the dropped tokens are
masked out as keys in every later block."""

import pytest
import timm
import torch
from reference import with_keys_masked
from vits import assert_compiles_once, image_batch, rows_counting_video, zeros_bias_vit

import fxprune
from fxprune.tools.show import token_sources
from fxprune.tools.zoo import TINY_VIT

MODELS = {  # the zoo's tiny configs (25 patches, no head size equal to a token count), read from the class token
    "rotary (EVA-02)": ("eva02_tiny_patch14_224", {}),
    "rotary from the patch grid, registers (DINOv3)": ("vit_small_patch16_dinov3", {}),
    "relative position bias (BEiT)": ("beit_base_patch16_224", {}),
    "relative position MLP (vit_relpos)": ("vit_relpos_small_patch16_224", {"class_token": True}),
}
POLICIES = {  # (policy, whether it removes rows before its block's attention)
    "topk": (fxprune.TopK(0.6, (1, 2)), False),
    "ats": (fxprune.ATS(0.6, (1, 2)), False),
    "dynamicvit": (fxprune.DynamicViT(0.6, (1, 2)), True),
}


def _model(name: str) -> torch.nn.Module:
    timm_name, overrides = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(timm_name, pretrained=False, **TINY_VIT, **overrides, global_pool="token")
    if isinstance(model.head, torch.nn.Linear):
        torch.nn.init.normal_(model.head.weight)  # a head that reads something (some are zero at init)
    return model.eval().double()


def _kept(gm, image, before: bool) -> list[tuple[int, torch.Tensor]]:
    """(first block whose keys are only the kept rows, the kept rows' original indices) after each reduction."""
    return [(step.block + (0 if before else 1), step.sources[0].abs().sum(0).nonzero().flatten())
            for step in token_sources(gm, image)]


@pytest.mark.parametrize("method", sorted(POLICIES))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_reduced_model_equals_the_dense_one_with_the_dropped_tokens_masked_as_keys(name, method):
    model, (policy, before) = _model(name), POLICIES[method]
    gm = fxprune.transform(model, policy)
    images = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        batched = gm(images)
    for i in range(images.shape[0]):
        image = images[i:i + 1]
        kept = _kept(gm, image, before)
        assert all(len(rows) < model_rows for (_, rows), model_rows in zip(kept, [26, 26]))  # it reduced
        torch.testing.assert_close(batched[i:i + 1], with_keys_masked(model, image, kept), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_keeping_every_token_reproduces_a_position_dependent_model(name):
    model = _model(name)
    images = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fxprune.transform(model, fxprune.TopK(1.0, (1, 2)))(images), model(images),
                                   atol=1e-10, rtol=0)


MERGING = {"evit-fused": fxprune.EViT(0.6, (1,)), "tome": fxprune.ToMe(3, (1,))}  # rows standing for several


@pytest.mark.parametrize("method", sorted(MERGING))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_merged_rows_take_one_patchs_position_and_give_each_image_what_it_gets_alone(name, method):
    model = _model(name)
    gm = fxprune.transform(model, MERGING[method])
    assert any("stands for several patches takes one patch's position" in n for n in gm.fxprune_plan.notes)
    images = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        batched = gm(images)
        alone = torch.cat([gm(images[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone, atol=1e-10, rtol=0)
    assert gm.fxprune_plan.rows[1].tokens_out < gm.fxprune_plan.rows[1].tokens_in


@pytest.mark.parametrize("name", sorted(MODELS))
def test_merging_methods_at_their_identity_settings_reproduce_a_position_dependent_model(name):
    model = _model(name)
    images = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        for policy in (fxprune.EViT(1.0, (1, 2)), fxprune.ToMe(0, (1, 2))):
            torch.testing.assert_close(fxprune.transform(model, policy)(images), model(images), atol=1e-10, rtol=0)


def test_the_plan_says_which_blocks_take_their_position_terms_at_the_kept_rows():
    plan = fxprune.plan(_model("rotary (EVA-02)"), fxprune.TopK(0.6, (1,)))
    assert any(note.startswith("block(s) 2 read position terms") for note in plan.notes)


def test_the_analysis_shows_each_blocks_position_terms_and_their_token_axes():
    program = fxprune.analyse(_model("relative position bias (BEiT)"))
    terms = program.blocks[1].position_terms
    assert [(term.axes, term.patches_only) for term in terms] == [((2, 3), False)]
    assert program.blocks[1].reducible and "unsqueeze" in str(program)


def test_position_terms_at_the_rows_positions_compile_to_one_graph():
    model = _model("rotary (EVA-02)").float()
    assert_compiles_once(fxprune.transform(model, fxprune.TopK(0.6, (1, 2))), model)


@pytest.mark.parametrize("name", ["relative position bias (BEiT)", "relative position MLP (vit_relpos)"])
def test_under_a_per_query_bias_only_the_kept_queries_attend_with_their_rows_of_it(name, monkeypatch):
    from fxprune.passes import common

    model = _model(name)
    images = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    policy = fxprune.Compose([fxprune.ToMe(2, (0,)), fxprune.TopK(0.6, (1, 2))])  # sizes: a bias per mask
    inside = fxprune.transform(model, policy)
    assert any(node.name.endswith("kept_mask_rows") for node in inside.graph.nodes)
    monkeypatch.setattr(common, "_mask_shape", lambda mask: None)  # a mask not known: select after the add
    after = fxprune.transform(model, policy)
    assert not any(node.name.endswith("kept_mask_rows") for node in after.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(inside(images), after(images), atol=1e-10, rtol=0)
    for row_inside, row_after in zip(inside.fxprune_plan.rows[1:3], after.fxprune_plan.rows[1:3]):
        assert row_inside.macs_after < row_after.macs_after


@pytest.mark.parametrize("method", ["topk", "ats"])
def test_rotary_positions_numbered_from_the_rows_count_every_token(method):
    model, (policy, before) = rows_counting_video(), POLICIES[method]
    gm = fxprune.transform(model, policy)  # before: an index out of range (tables for the remaining rows)
    clips = torch.randn(2, 4, 3, 48, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        batched = gm(clips).logits
    for i in range(clips.shape[0]):
        clip = clips[i:i + 1]
        kept = _kept(gm, clip, before)
        assert all(len(rows) < 72 for _, rows in kept)
        torch.testing.assert_close(batched[i:i + 1], with_keys_masked(model, clip, kept).logits, atol=1e-5, rtol=0)


def test_a_term_of_each_image_is_taken_at_that_images_rows_and_a_shared_one_at_every_images():
    from fxprune.ops.positions import at_positions

    positions = torch.tensor([[0, 2, 3], [0, 1, 1]])[..., None]  # [B, N', 1]: each image's rows' positions
    for term in (torch.randn(2, 1, 4, 4), torch.randn(1, 1, 4, 4)):  # a mask made per image, a bias shared by all
        out = at_positions(term, positions, (2, 3), False, 1, 4)  # before: [B, B, 1, N', N'] for the first
        assert out.shape == (2, 1, 3, 3)
        for image, rows in enumerate(positions[..., 0]):
            own = term[image if term.shape[0] > 1 else 0, 0]
            torch.testing.assert_close(out[image, 0], own[rows][:, rows], atol=0, rtol=0)


@pytest.mark.parametrize("policy", [fxprune.EViT(0.5, (1, 2)), fxprune.ToMe(3, (0, 1, 2)), fxprune.ATS(8, (1, 2)),
                                    fxprune.DynamicViT(0.5, (1, 2)), fxprune.AdaViT(0.5)],
                         ids=["evit", "tome", "ats", "dynamicvit", "adavit"])
def test_a_mask_made_per_image_is_taken_at_each_images_rows_and_each_image_gets_what_it_gets_alone(policy):
    model = zeros_bias_vit()
    fast = fxprune.transform(model, policy)  # before: refused ("assumes the original token count"); AdaViT failed
    x = image_batch(model, batch=3)
    with torch.no_grad():
        out = fast(x)
        for image in range(3):
            torch.testing.assert_close(out[image : image + 1], fast(x[image : image + 1]), atol=1e-5, rtol=0)
        if isinstance(policy, fxprune.AdaViT):  # skipping as the official masking does
            masked = fxprune.transform(model, fxprune.AdaViT(0.5, skip=False))
            masked.load_state_dict(fast.state_dict())
            torch.testing.assert_close(out, masked(x), atol=1e-5, rtol=0)
