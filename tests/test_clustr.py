import math
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from reference import clustr_beit, clustr_vit
from vits import (
    ALL_MODELS,
    FAITHFUL_MODELS,
    TokenMixer,
    assert_compiles_once,
    assert_same_outputs,
    hand_written_vit,
    image_batch,
    logits,
    timm_vit,
    with_explicit_softmax,
    with_position_bias_in_block_3,
)

import fxprune
from fxprune import (
    ClusTR,
    Compose,
    EViT,
    PolicyError,
    ToMe,
    UnsupportedModelError,
    parse_policy,
)
from fxprune.analysis import SDPA_TARGETS
from fxprune.ops import clustered_attention, padded_cluster_keys_values
from fxprune.ops.clustering import cluster_assignment
from fxprune.tools.zoo import TINY_VIT


def _assert_matches_reference(gm, reference, model, batch=3):
    x = image_batch(model, batch=batch, dtype=torch.float64)
    with torch.no_grad():
        out, expected, dense = gm(x), reference(x), model(x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert (out - dense).abs().max() > 1e-3  # clustering changed the outputs, so the match means something


@pytest.mark.parametrize("scales", [5, (3, 8)], ids=["single-scale", "multi-scale"])
@pytest.mark.parametrize("name", FAITHFUL_MODELS)
def test_rewritten_graph_matches_independent_implementation_in_float64(name, scales):
    model = timm_vit(name).double()
    gm = fxprune.transform(model, ClusTR(scales, (1, 2)))  # DPC-KNN, one pass
    groups = scales if isinstance(scales, tuple) else (scales,)
    _assert_matches_reference(gm, lambda x: clustr_vit(model, x, groups, (1, 2), "dpc", 0), model)


@pytest.mark.parametrize("clustering, iterations", [("dpc", 2), ("kmeans", 0), ("kmeans", 3)])
@pytest.mark.parametrize("name", ["deit_small_distilled_patch16_224", "vit_small_patch14_reg4_dinov2"])
def test_lloyd_steps_and_farthest_point_kmeans_match_independent_implementation(name, clustering, iterations):
    model = timm_vit(name).double()
    gm = fxprune.transform(model, ClusTR((3, 8), (1, 2), iterations=iterations, clustering=clustering))
    reference = partial(clustr_vit, model, scales=(3, 8), layers=(1, 2), clustering=clustering, iterations=iterations)
    _assert_matches_reference(gm, reference, model)


@pytest.mark.parametrize("clustering, iterations", [("dpc", 0), ("kmeans", 3)])  # the defaults
def test_explicit_softmax_attention_is_clustered_too(clustering, iterations):
    model = with_explicit_softmax(timm_vit("deit_small_patch16_224").double())
    gm = fxprune.transform(model, ClusTR((3, 8), (0, 3), clustering=clustering))
    assert not any(n.target is clustered_attention for n in gm.graph.nodes)
    assert sum(n.target is padded_cluster_keys_values for n in gm.graph.nodes) == 2
    _assert_matches_reference(gm, lambda x: clustr_vit(model, x, (3, 8), (0, 3), clustering, iterations), model)


@pytest.mark.parametrize("clustering, iterations", [("dpc", 2), ("kmeans", 3)])
def test_after_tome_token_sizes_weight_the_clusters(clustering, iterations):
    model = timm_vit("deit_small_patch16_224").double()
    text = f"tome:r=3,layers=0 + clustr:m=5,layers=1,2,clustering={clustering},iterations={iterations}"
    gm = fxprune.transform(model, parse_policy(text))
    reference = partial(clustr_vit, model, scales=(5,), layers=(1, 2), clustering=clustering, iterations=iterations,
                        tome=(3, (0,)))
    _assert_matches_reference(gm, reference, model)


@pytest.mark.parametrize("name, clustering", [
    ("hf_vit", "dpc"), ("deit_small_patch16_224", "kmeans"), ("hand_written", "kmeans"),  # fused and explicit
])
def test_each_token_its_own_cluster_reproduces_the_model_per_head_group_and_clustering(name, clustering):
    # DPC-KNN at one scale on every architecture: test_methods.py (ClusTR's identity setting)
    model = ALL_MODELS[name]()
    tokens = fxprune.analyse(model).tokens
    heads = fxprune.analyse(model).blocks[0].attention.num_heads
    scales = tokens if heads % 2 else (tokens, tokens + 5)  # multi-scale where the heads split in two
    gm = fxprune.transform(model, ClusTR(scales, clustering=clustering))
    assert sum(n.target in (clustered_attention, padded_cluster_keys_values) for n in gm.graph.nodes) == 4
    assert_same_outputs(gm, model)


def test_fewer_clusters_than_tokens_change_every_architecture_a_little():
    for name, factory in ALL_MODELS.items():
        model = factory()
        x = image_batch(model, batch=2)
        with torch.no_grad():
            dense, clustered = logits(model(x)), logits(fxprune.transform(model, ClusTR(8))(x))
        error = (clustered - dense).norm() / dense.norm()
        assert 0 < error < 0.5, name


def test_fused_attention_is_kept_over_prefix_plus_cluster_keys():
    model = timm_vit("deit_small_patch16_224")  # 16 patches + cls, 6 heads
    gm = fxprune.transform(model, ClusTR((4, 9), (1,)))
    seen = []

    def spy(q, k, v, **kwargs):
        seen.append((q.shape[1:3], k.shape[1:3]))
        return original(q, k, v, **kwargs)

    original = F.scaled_dot_product_attention
    try:
        F.scaled_dot_product_attention = spy
        with torch.no_grad():
            gm(image_batch(model))
    finally:
        F.scaled_dot_product_attention = original
    assert (torch.Size([3, 17]), torch.Size([3, 5])) in seen and (torch.Size([3, 17]), torch.Size([3, 10])) in seen
    assert sum(n.target in SDPA_TARGETS for n in gm.graph.nodes) == 3  # the other blocks keep theirs


@pytest.mark.parametrize("clustering, iterations", [("dpc", 0), ("dpc", 2), ("kmeans", 3)])
def test_macs_count_the_smaller_attention_and_the_clustering(clustering, iterations):
    model = timm_vit("deit_small_patch16_224")  # 16 patches + cls, 6 heads of 64
    x = image_batch(model, batch=1)
    m, n, heads, d = 4, 17, 6, 64
    gm = fxprune.transform(model, ClusTR(m, (0, 2), iterations=iterations, clustering=clustering))
    saved_attention = heads * n * (n - (1 + m)) * 2 * d
    # of the head-averaged keys: DPC's pairwise distances, or the distances to the mean and to each seed
    seeding = (n - 1) * (n - 1) * d if clustering == "dpc" else (m + 1) * (n - 1) * d
    lloyd = iterations * (n - 1) * m * d  # distances to the centroids
    assert fxprune.flops(model, x) - fxprune.flops(gm, x) == 2 * (saved_attention - seeding - lloyd)


def test_a_few_fine_tuning_steps_reduce_the_loss():
    from fxprune.datasets import DigitScenes
    from fxprune.models import digits_vit

    data = DigitScenes("train", 32, seed=3)
    images = torch.stack([data[i][0] for i in range(32)])
    labels = torch.tensor([data[i][1] for i in range(32)])
    gm = fxprune.transform(digits_vit(), ClusTR(4)).train()
    optimizer = torch.optim.Adam(gm.parameters(), lr=3e-4)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(gm(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_multi_scale_kmeans_and_sized_clustering_compile_as_one_graph_without_recompiles():
    # one scale of DPC-KNN alone: test_methods.py
    model = timm_vit("deit_small_patch16_224")
    policy = Compose([ToMe(2, (0,)), ClusTR((4, 9), (1,)), ClusTR(5, (2,), clustering="kmeans")])
    assert_compiles_once(fxprune.transform(model, policy), model)


def test_composes_with_token_selection_and_the_plan_names_each_method():
    model = timm_vit("deit_small_patch16_224")
    gm = fxprune.transform(model, Compose([ClusTR(6, (0, 1)), EViT(0.5, (2,))]))
    rows = gm.fxprune_plan.rows
    assert [r.action.split()[0] for r in rows] == ["clustr", "clustr", "evit", "dense"]
    assert [(r.tokens_in, r.tokens_out) for r in rows[:3]] == [(17, 17), (17, 17), (17, 10)]  # 8 kept + cls + fused
    assert "clustr 6 clusters (DPC-KNN)" in str(gm.fxprune_plan)


def test_heads_that_do_not_split_into_the_groups_are_refused_naming_the_block():
    model = timm_vit("vit_tiny_patch16_224")  # 3 heads
    with pytest.raises(UnsupportedModelError, match=r"block 1 \(blocks\.1\): its 3 heads cannot be split into 2"):
        fxprune.transform(model, ClusTR((4, 8), (1,)))


class _CausalMixer(TokenMixer):
    def forward(self, tokens):
        b, n, c = tokens.shape
        q, k, v = self.split(tokens)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, c))


class _KeyMaskedMixer(TokenMixer):
    """Explicit attention whose logits get a per-key bias computed from the tokens."""

    def forward(self, tokens):
        b, n, c = tokens.shape
        q, k, v = self.split(tokens)
        bias = tokens[..., :1].transpose(1, 2).unsqueeze(1).sigmoid().log()
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // self.heads) + bias, dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("mixer, message", [
    (_CausalMixer, r"block 2 \(stages\.2\): its attention is causal"),
    (_KeyMaskedMixer, r"block 2 \(stages\.2\): its logits read .* \(a mask or bias\) between q @ kᵀ and the softmax"),
])
def test_attention_that_clusters_cannot_reproduce_is_refused_naming_the_block(mixer, message):
    model = hand_written_vit()
    model.stages[2].mix = mixer(48, 3)
    fxprune.transform(model, ClusTR(4, (1, 3)))  # the other blocks are fine
    with pytest.raises(UnsupportedModelError, match=message):
        fxprune.transform(model, ClusTR(4, (2,)))


def _tiny_beit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", pretrained=False, **TINY_VIT, global_pool="token").eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.relative_position_bias_table, std=2.0)  # biases that matter (0 at init)
    torch.nn.init.normal_(model.head.weight)
    return model.double()


@pytest.mark.parametrize("scales", [5, (3, 8)], ids=["single-scale", "multi-scale"])
def test_a_relative_position_bias_gives_each_query_the_log_summed_bias_of_a_clusters_members(scales):
    model = _tiny_beit()
    gm = fxprune.transform(model, ClusTR(scales, (1, 2)))
    assert any("block(s) 1, 2: the attention has a bias per query and key" in n for n in gm.fxprune_plan.notes)
    groups = scales if isinstance(scales, tuple) else (scales,)
    _assert_matches_reference(gm, lambda x: clustr_beit(model, x, groups, (1, 2), "dpc", 0), model)
    identity = fxprune.transform(model, ClusTR(10**6, (1, 2)))
    x = image_batch(model, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(identity(x), model(x), atol=1e-10, rtol=0)


def test_a_relative_position_bias_after_merging_and_padding_gives_each_image_what_it_gets_alone():
    model = _tiny_beit()
    x = image_batch(model, batch=4, dtype=torch.float64)
    for first in (ToMe(4, (0,)), fxprune.ATS(0.5, (0,)), fxprune.TopK(0.5, (0,))):
        gm = fxprune.transform(model, Compose([first, ClusTR(4, (1, 2))]))
        with torch.no_grad():
            batched, alone = gm(x), torch.cat([gm(x[i:i + 1]) for i in range(x.shape[0])])
        torch.testing.assert_close(batched, alone, atol=1e-10, rtol=0)
        kept = fxprune.transform(model, first)
        with torch.no_grad():
            torch.testing.assert_close(fxprune.transform(model, Compose([first, ClusTR(10**6, (1, 2))]))(x), kept(x),
                                       atol=1e-10, rtol=0)


def test_an_explicit_softmax_with_a_bias_per_query_is_refused_naming_the_block():
    model = timm_vit("deit_small_patch16_224")
    assert fxprune.transform(model, ClusTR(4, (1,))) is not None
    with pytest.raises(UnsupportedModelError, match=r"cannot apply clustr .* to block 3 .* its logits read stages_3"):
        fxprune.transform(with_position_bias_in_block_3(), ClusTR(4, (3,)))


def test_policy_is_validated_and_parses_from_text():
    assert parse_policy("clustr:m=16,49,layers=0,1,iterations=2") == ClusTR((16, 49), (0, 1), iterations=2)
    assert parse_policy("clustr:num_clusters=49") == ClusTR(49) == ClusTR(49, iterations=0, clustering="dpc")
    assert parse_policy("clustr:m=16,clustering=KMeans") == ClusTR(16, iterations=3, clustering="kmeans")
    assert ClusTR(49, clustering="kmeans", iterations=1).bind(3) == ClusTR(49, (0, 1, 2), 1, "kmeans")
    bad_values = [
        (dict(num_clusters=0), "num_clusters"), (dict(num_clusters=(4, 0)), "num_clusters"),
        (dict(num_clusters=4, iterations=-1), "iterations"), (dict(num_clusters=4, iterations=1.5), "iterations"),
        (dict(num_clusters=4, clustering="grid"), "clustering"), (dict(num_clusters=4, clustering=None), "clustering"),
    ]
    for bad, field in bad_values:
        with pytest.raises(PolicyError, match=rf"ClusTR\.{field}"):
            ClusTR(**bad)
    assert ClusTR(8, (1,)).tokens_out(17, 1, 1) == 17


def test_description_names_the_clustering_and_any_lloyd_iterations():
    assert ClusTR(16).describe() == "clustr 16 clusters (DPC-KNN)"
    assert ClusTR(16, iterations=2).describe() == "clustr 16 clusters (DPC-KNN, 2 Lloyd iterations)"
    assert ClusTR((4, 16), clustering="kmeans").describe() == (
        "clustr 4,16 clusters per head group (farthest-point k-means, 3 Lloyd iterations)"
    )
    assert ClusTR(16, iterations=0, clustering="kmeans").describe() == "clustr 16 clusters (farthest-point k-means)"


def _image_keys(tokens: int, generator: torch.Generator, heads: int = 2, width: int = 8) -> tuple:
    """Keys and values ``[1, heads, tokens, width]`` of one image, float64."""
    return tuple(torch.randn(1, heads, tokens, width, generator=generator, dtype=torch.float64) for _ in range(2))


def _padded_batch(images: list[tuple], length: int) -> tuple:
    """The images' keys and values padded to ``length`` tokens with rows of weight 0 (mask −inf), batched.

    The padding rows are all the same point far from the keys: a cluster of high density and the
    farthest points, so any padding that entered the clustering would change it."""
    keys, values, masks = [], [], []
    for k, v in images:
        extra = length - k.shape[2]
        keys.append(torch.cat([k, torch.full((1, k.shape[1], extra, k.shape[3]), 30.0, dtype=k.dtype)], dim=2))
        values.append(torch.cat([v, torch.full((1, v.shape[1], extra, v.shape[3]), 7.0, dtype=v.dtype)], dim=2))
        masks.append(torch.cat([torch.zeros(k.shape[2]), torch.full((extra,), -math.inf)]).to(k.dtype))
    return torch.cat(keys), torch.cat(values), torch.stack(masks)[:, None, None, :]


@pytest.mark.parametrize("clustering, iterations", [("dpc", 0), ("dpc", 2), ("kmeans", 0), ("kmeans", 3)])
def test_padding_rows_of_weight_zero_leave_each_image_clustered_as_alone(clustering, iterations):
    generator = torch.Generator().manual_seed(0)
    prefix, clusters = 1, 6
    # more real tokens than clusters; a few more; fewer than clusters and than DPC's 5 neighbours
    images = [_image_keys(tokens, generator) for tokens in (20, 9, 4)]
    k, v, mask = _padded_batch(images, 24)
    q = torch.randn(3, 2, 5, 8, generator=generator, dtype=torch.float64)
    cluster = ((clusters,), prefix, clustering, iterations)
    batched = clustered_attention(q, k, v, *cluster, attn_mask=mask)
    weights = mask[:, 0, 0].exp()
    labels = cluster_assignment(k, clusters, prefix, clustering, iterations, weights)
    for i, (ki, vi) in enumerate(images):
        alone = clustered_attention(q[i : i + 1], ki, vi, *cluster)
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-12, rtol=0)
        real = ki.shape[2] - prefix
        ones = torch.ones(1, ki.shape[2], dtype=ki.dtype)
        alone_labels = cluster_assignment(ki, min(clusters, real), prefix, clustering, iterations, ones)
        assert torch.equal(labels[i, :real], alone_labels[0])  # the same clusters, in the same order


@pytest.mark.parametrize("clustering, iterations", [("dpc", 0), ("dpc", 2), ("kmeans", 3)])
def test_more_clusters_than_real_tokens_give_each_real_token_its_own_cluster(clustering, iterations):
    generator = torch.Generator().manual_seed(1)
    k, v = _image_keys(5, generator)  # the prefix token and 4 patches
    padded_k, padded_v, mask = _padded_batch([(k, v)], 12)
    q = torch.randn(1, 2, 5, 8, generator=generator, dtype=torch.float64)
    out = clustered_attention(q, padded_k, padded_v, (7,), 1, clustering, iterations, attn_mask=mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-12, rtol=0)
    labels = cluster_assignment(padded_k, 7, 1, clustering, iterations, mask[:, 0, 0].exp())
    assert sorted(labels[0, :4].tolist()) == [0, 1, 2, 3]  # the real tokens take the first clusters, one each
    keys, _, bias = padded_cluster_keys_values(padded_k, padded_v, (7,), 1, clustering, iterations, attn_mask=mask)
    assert keys.shape[2] == 8 and bias[0, 0, 0, 5:].eq(-math.inf).all()  # the other clusters are empty
