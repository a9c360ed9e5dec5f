import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from vits import timm_vit

import fxprune
from fxprune import EViT
from fxprune.counting import MacCounter


@pytest.fixture(scope="module")
def deit_small():
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


def test_deit_small_is_4_6_gmacs(deit_small):
    assert fxprune.flops(deit_small, torch.randn(1, 3, 224, 224)) / 1e9 == pytest.approx(4.6, abs=0.05)


@pytest.mark.parametrize("keep_rate, gmacs", [(0.9, 4.0), (0.7, 3.0), (0.5, 2.3)])
def test_evit_on_deit_small_gives_the_papers_macs(deit_small, keep_rate, gmacs):
    gm = fxprune.transform(deit_small, EViT(keep_rate, (3, 6, 9)))
    assert fxprune.flops(gm, torch.randn(1, 3, 224, 224)) / 1e9 == pytest.approx(gmacs, abs=0.05)
    assert gm.fxprune_plan.macs_after / 1e9 == pytest.approx(gmacs, abs=0.05)


def test_fused_attention_is_counted_on_the_cpu():
    B, H, N, d = 2, 3, 10, 8
    counter = MacCounter()
    with counter:
        F.scaled_dot_product_attention(*(torch.randn(B, H, N, d) for _ in range(3)))
    assert counter.total == 2 * B * H * N * N * d


def test_multihead_attention_fast_path_counts_like_its_decomposition():
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    counter = MacCounter()
    with torch.no_grad(), counter:
        mha(x, x, x, need_weights=False)
    assert counter.total == 2 * 5 * 16 * 16 * 4 + 2 * 4 * 5 * 5 * 4 * 2


def test_flops_is_per_image_and_linear_counts_in_times_out():
    linear = nn.Linear(3, 4)
    assert fxprune.flops(linear, torch.randn(5, 7, 3)) == 7 * 3 * 4


def test_flops_of_arguments_by_name_counts_per_image_of_the_first_tensor():
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x, memory = torch.randn(5, 3, 16), torch.randn(5, 7, 16)
    positional = fxprune.flops(mha, (x, memory, memory))
    assert positional == 3 * 16 * 16 + 2 * 7 * 16 * 16 + 2 * 3 * 7 * 16 + 3 * 16 * 16
    assert fxprune.flops(mha, {"query": x, "key": memory, "value": memory, "need_weights": False}) == positional


def test_plan_macs_match_measured_flops():
    model = timm_vit("deit_small_patch16_224")
    gm = fxprune.transform(model, EViT(0.5, (1, 2)))
    x = torch.randn(1, 3, 32, 32)
    assert gm.fxprune_plan.macs_before == fxprune.flops(model, x)
    assert gm.fxprune_plan.macs_after == fxprune.flops(gm, x)


def test_counting_within_inference_mode_counts_what_it_counts_without():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    outside = fxprune.flops(model, torch.zeros(1, 3, 32, 32))
    with torch.inference_mode():  # composite ops (linear, layer_norm, SDPA) reach the counter whole there
        assert fxprune.flops(model, torch.zeros(1, 3, 32, 32)) == outside
        inference_model = copy.deepcopy(model)  # its weights inference tensors
    assert fxprune.flops(inference_model, torch.zeros(1, 3, 32, 32)) == outside > 0


def test_products_in_place_or_into_an_output_count_as_products():
    a, b, c = torch.randn(4, 5), torch.randn(5, 6), torch.randn(4, 6)
    batched, other = torch.randn(2, 4, 5), torch.randn(2, 5, 6)
    with torch.no_grad(), MacCounter() as counter:
        c.addmm_(a, b)
        torch.mm(a, b, out=torch.empty(4, 6))
        torch.addmm(c, a, b, out=torch.empty(4, 6))
        torch.randn(2, 4, 6).baddbmm_(batched, other)
        torch.bmm(batched, other, out=torch.empty(2, 4, 6))
    assert counter.total == 3 * 4 * 5 * 6 + 2 * 2 * 4 * 5 * 6
