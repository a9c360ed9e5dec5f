import pytest
import timm
import torch
import torch.fx as fx
from reference import cait_vit, evit_vit
from vits import (
    FAITHFUL_MODELS,
    PREFIX_TOKENS,
    hand_written_vit,
    hf_vit,
    image_batch,
    logits,
    timm_vit,
    torchvision_vit,
    with_explicit_softmax,
)

import fxprune
from fxprune import EViT, TopK
from fxprune.analysis import SDPA_TARGETS
from fxprune.ops import evit_select


@pytest.mark.parametrize("name", FAITHFUL_MODELS)
@pytest.mark.parametrize("fuse", [True, False], ids=["evit", "topk"])
def test_rewritten_graph_matches_independent_eager_implementation_in_float64(name, fuse):
    model = timm_vit(name).double()
    policy = EViT(0.5, (1, 2), fuse=fuse) if fuse else TopK(0.5, (1, 2))
    gm = fxprune.transform(model, policy)
    x = image_batch(model, batch=4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), evit_vit(model, x, 0.5, (1, 2), fuse=fuse), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fuse", [True, False], ids=["evit", "topk"])
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_without_a_class_token_tokens_are_ranked_by_the_attention_they_receive_in_float64(fuse, pool):
    model = timm_vit("vit_tiny_patch16_224", class_token=False, global_pool=pool).double()
    policy = EViT(0.5, (1, 2), fuse=fuse) if fuse else TopK(0.5, (1, 2))
    gm = fxprune.transform(model, policy)
    assert any("scores tokens by attention received" in note for note in gm.fxprune_plan.notes)
    x = image_batch(model, batch=4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), evit_vit(model, x, 0.5, (1, 2), fuse=fuse), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fuse", [True, False], ids=["evit", "topk"])
def test_talking_heads_blocks_without_a_class_token_match_an_eager_cait_in_float64(fuse):
    torch.manual_seed(0)
    model = timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                              embed_dim=64, num_heads=2, depth_token_only=1, init_values=1.0).eval().double()
    policy = EViT(0.5, (1, 2), fuse=fuse) if fuse else TopK(0.5, (1, 2))
    gm = fxprune.transform(model, policy)
    x = image_batch(model, batch=4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), cait_vit(model, x, 0.5, (1, 2), fuse), atol=1e-6, rtol=0)
        assert (gm(x) - model(x)).abs().max() > 1e-4  # it reduced, so the match means something


def test_the_plan_names_the_class_token_score_where_the_model_has_one():
    plan = fxprune.plan(timm_vit("vit_tiny_patch16_224"), TopK(0.5, (1,)))
    assert "topk keep 0.5 scores tokens by class-token attention (row 0)" in plan.notes


def test_explicit_softmax_attention_matches_the_reference_too():
    model = with_explicit_softmax(timm_vit("deit3_small_patch16_224").double())
    gm = fxprune.transform(model, EViT(0.7, (0, 2)))
    x = image_batch(model, batch=4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), evit_vit(model, x, 0.7, (0, 2)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("factory", [torchvision_vit, hf_vit, hand_written_vit])
@pytest.mark.parametrize(
    "policy, tokens", [(EViT(0.5, (1, 2)), [17, 10, 7, 7]), (TopK(0.5, (1, 2)), [17, 9, 5, 5])], ids=["evit", "topk"]
)
def test_other_architectures_reduce_tokens_as_planned(factory, policy, tokens):
    model = factory()
    gm = fxprune.transform(model, policy)
    assert [r.tokens_out for r in gm.fxprune_plan.rows] == tokens
    out = logits(gm(image_batch(model, batch=3)))
    assert out.shape[0] == 3 and torch.isfinite(out).all()


def _sdpa_count(gm):
    return sum(n.op == "call_function" and n.target in SDPA_TARGETS for n in gm.graph.nodes)


@pytest.mark.parametrize("factory", [lambda: timm_vit("deit_small_patch16_224"), torchvision_vit, hf_vit])
@pytest.mark.parametrize(
    "policy, inserted",
    [
        (EViT(0.5, (0, 1, 2, 3)), ["class_attention", "evit_select"]),  # selects after the residual add
        (TopK(0.5, (0, 1, 2, 3)), ["class_attention", "topk_rows", "gather_queries", "gather_tokens"]),  # inside
    ],
    ids=["evit", "topk"],
)
def test_every_fused_attention_call_is_kept(factory, policy, inserted):
    model = factory()
    gm = fxprune.transform(model, policy)
    assert _sdpa_count(gm) == _sdpa_count(fxprune.trace(model)) == 4
    assert [n.target.__name__ for n in gm.graph.nodes if "fxprune" in n.meta] == inserted * 4


class _Recorder(fx.Interpreter):
    """Records the inputs and outputs of fxprune's selection nodes."""

    def __init__(self, gm):
        super().__init__(gm)
        self.selections = []

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        if target is evit_select:
            self.selections.append((args[0], out))
        return out


@pytest.mark.parametrize("name", ["deit_small_distilled_patch16_224", "vit_small_patch14_reg4_dinov2"])
def test_prefix_tokens_are_never_dropped(name):
    model = timm_vit(name)
    gm = fxprune.transform(model, EViT(0.25, (0, 1, 2)))
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(image_batch(model))
    prefix = PREFIX_TOKENS[name]
    assert len(recorder.selections) == 3
    for tokens_in, tokens_out in recorder.selections:
        torch.testing.assert_close(tokens_out[:, :prefix], tokens_in[:, :prefix], atol=0, rtol=0)
