import pytest
import torch
from reference import ats_step, dynamicvit_step, evit_step, reduced_vit, tome_step
from vits import hf_vit, image_batch, logits, timm_vit, torchvision_vit, with_explicit_softmax

import fxprune
from fxprune import ATS, DynamicViT, EViT, ToMe, TopK
from fxprune.analysis import SDPA_TARGETS
from fxprune.methods import ats, evit
from fxprune.ops import gather_queries
from fxprune.tools.show import kept_counts


@pytest.mark.parametrize("policy", [ATS(9, (1,)), TopK(0.5, (1,))], ids=["ats", "topk"])
def test_fused_attention_attends_with_the_kept_queries_only(policy):
    model = timm_vit("deit_small_patch16_224")
    gm = fxprune.transform(model, policy)
    sdpa = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
    assert sdpa[1].args[0].target is gather_queries and sdpa[0].args[0].target is not gather_queries
    explicit = with_explicit_softmax(timm_vit("deit_small_patch16_224"))
    after = fxprune.plan(explicit, policy).rows[1]  # selects after the residual add
    inside = gm.fxprune_plan.rows[1]
    assert inside.tokens_out == after.tokens_out == 9 and inside.macs_after < after.macs_after


@pytest.mark.parametrize(
    "factory", [lambda: timm_vit("deit_small_distilled_patch16_224"), torchvision_vit, hf_vit],
    ids=["timm-distilled", "torchvision", "hf"],
)
@pytest.mark.parametrize("policy", [ATS(7, (1, 2)), TopK(0.5, (1, 2))], ids=["ats", "topk"])
def test_keeping_rows_inside_the_attention_gives_the_outputs_of_selecting_after_the_residual_add(
    factory, policy, monkeypatch
):
    model = factory().double()
    inside = fxprune.transform(model, policy)
    assert any(n.target is gather_queries for n in inside.graph.nodes)
    for module in (ats, evit):
        monkeypatch.setattr(module, "can_select_queries", lambda block: False)
    after = fxprune.transform(model, policy)
    assert not any(n.target is gather_queries for n in after.graph.nodes)
    x = image_batch(model, batch=4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(logits(inside(x)), logits(after(x)), atol=1e-10, rtol=0)


@pytest.mark.parametrize("policy", [ATS(9, (1,)), TopK(0.5, (1,))], ids=["ats", "topk"])
def test_kept_queries_keep_the_batch_read_when_the_batch_equals_the_token_count(policy):
    model = timm_vit("deit_small_patch16_224")  # 17 tokens: captured on 17 images, B and N read alike
    gm = fxprune.transform(model, policy, example_inputs=torch.randn(17, 3, 32, 32))  # before: refused at batch 18
    x = image_batch(model, batch=3)
    torch.testing.assert_close(gm(x)[1:2], gm(x[1:2]), atol=1e-5, rtol=0)


def _then(*steps):
    """Steps of :func:`reduced_vit` one after the other."""

    def step(x, size, probs, k, v):
        for each in steps:
            x, size = each(x, size, probs, k, v)
        return x, size

    return step


PARALLEL = {  # policies on timm's parallel blocks (ViT-22B's), each block's steps as the reference takes them
    "chain": (fxprune.Compose([ATS(None, (1,)), ToMe(3, (2,)), EViT(0.7, (3,))]),
              lambda model, gm: {1: ats_step(model, None), 2: tome_step(model, 3), 3: evit_step(model, 0.7)}, 2),
    "topk": (TopK(0.6, (1, 2)), lambda model, gm: {i: evit_step(model, 0.6, fuse=False) for i in (1, 2)}, None),
    "dynamicvit": (  # at block 2's input: the tokens ToMe left at the end of block 1, where a parallel block ends
        fxprune.Compose([ToMe(3, (1,)), DynamicViT(0.7, (2,))]),
        lambda model, gm: {1: _then(tome_step(model, 3), dynamicvit_step(
            gm.get_submodule("fxprune.blocks_2.predictor"), int(25 * 0.7), 1))}, 1),
}


def _unlike_images() -> torch.Tensor:
    """Four 40×40 images, float64, that ATS keeps different numbers of tokens of: noise, faint noise, a ramp, and
    noise with its top half blank."""
    x = torch.randn(4, 3, 40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[1] *= 0.05
    x[2] = torch.linspace(-2, 2, 40, dtype=torch.float64).expand(3, 40, 40)
    x[3, :, :20] = 0
    return x


@pytest.mark.parametrize("name", sorted(PARALLEL))
def test_a_parallel_block_is_reduced_after_both_branches_as_the_reference_does(name):
    policy, steps, proportional_after = PARALLEL[name]
    model = timm_vit("vit_base_patch16_xp_224", img_size=40, patch_size=8, depth=4, embed_dim=64,
                     num_heads=2).double()
    gm = fxprune.transform(model, policy)
    assert not any(n.target is gather_queries for n in gm.graph.nodes)  # its MLP reads every query's row
    assert "parallel blocks" in str(gm.fxprune_plan)
    x = _unlike_images()
    if name == "chain":
        assert all(high - low >= 2 for _, _, low, high in kept_counts(gm, x))  # padded rows at every reduction
    with torch.no_grad():
        expected = reduced_vit(model, x, steps(model, gm), proportional_after)  # one image at a time
        torch.testing.assert_close(gm(x), expected, atol=1e-10, rtol=0)
        torch.testing.assert_close(fxprune.lower(gm, backend="eager")(x), expected, atol=1e-10, rtol=0)
    torch._dynamo.reset()
