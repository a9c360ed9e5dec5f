import pytest
import torch
from vits import hf_vit, image_batch, logits, timm_vit, torchvision_vit, with_explicit_softmax

import fxprune
from fxprune import ATS, TopK
from fxprune.analysis import SDPA_TARGETS
from fxprune.methods import ats, evit
from fxprune.ops import gather_queries


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
