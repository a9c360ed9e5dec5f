import math

import pytest
import torch
import torch.nn.functional as F

from fxprune.counting import MacCounter
from fxprune.ops import (
    class_attention,
    class_attention_from_probs,
    clustered_attention,
    evit_kept_tokens,
    evit_select,
    evit_select_positions,
    evit_select_sizes,
    padded_cluster_keys_values,
    received_attention,
    received_attention_from_probs,
    size_bias,
    size_weighted_mean,
    softmax_with_policy,
    tome_merge,
    tome_merge_positions,
    topk_rows,
)
from fxprune.ops.clustering import dpc_knn, farthest_point_seeds, lloyd
from fxprune.ops.merging import bipartite_matching
from fxprune.ops.selection import add_rows, gather_tokens


def _full_map(q, k, scale, mask=None):
    logits = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return logits.softmax(-1)


def test_class_attention_equals_the_first_row_of_the_full_map():
    q, k = torch.randn(2, 4, 9, 8, dtype=torch.float64), torch.randn(2, 4, 9, 8, dtype=torch.float64)
    expected = _full_map(q, k, 8**-0.5)[:, :, 0].mean(1)
    torch.testing.assert_close(class_attention(q, k), expected)
    torch.testing.assert_close(class_attention(q, k, scale=0.3), _full_map(q, k, 0.3)[:, :, 0].mean(1))


@pytest.mark.parametrize("kind", ["float", "bool"])
def test_class_attention_applies_the_masks_first_row(kind):
    q, k = torch.randn(2, 4, 9, 8, dtype=torch.float64), torch.randn(2, 4, 9, 8, dtype=torch.float64)
    mask = torch.randn(2, 1, 9, 9, dtype=torch.float64) if kind == "float" else torch.rand(2, 1, 9, 9) > 0.3
    mask[..., 0] = 0 if kind == "float" else True
    expected = _full_map(q, k, 8**-0.5, mask)[:, :, 0].mean(1)
    torch.testing.assert_close(class_attention(q, k, attn_mask=mask), expected)


def test_class_attention_handles_grouped_keys():
    q, k = torch.randn(2, 4, 9, 8, dtype=torch.float64), torch.randn(2, 2, 9, 8, dtype=torch.float64)
    expected = _full_map(q, k.repeat_interleave(2, dim=1), 8**-0.5)[:, :, 0].mean(1)
    torch.testing.assert_close(class_attention(q, k), expected)


def test_class_attention_costs_one_query_row_not_the_full_map():
    B, H, N, d = 2, 6, 197, 64
    counter = MacCounter()
    with counter:
        class_attention(torch.randn(B, H, N, d), torch.randn(B, H, N, d))
    assert counter.total == B * H * N * d


def _with_padding(q, k, real):
    """q, k [B, H, N, d] with the rows ``real`` [B, N] (False: padding) masked as keys: (key mask, each image's
    expected received attention from its own rows alone)."""
    mask = real[:, None, None, :]
    expected = torch.zeros(q.shape[0], q.shape[2], dtype=q.dtype)
    for b in range(q.shape[0]):
        rows = real[b].nonzero().flatten()
        probs = _full_map(q[b:b + 1, :, rows], k[b:b + 1, :, rows], q.shape[-1] ** -0.5)
        expected[b, rows] = probs.mean(dim=(1, 2))[0]
    return mask, expected


@pytest.mark.parametrize("chunk", [128, 3])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_received_attention_is_each_images_column_mean_of_its_own_rows(chunk, kind):
    q, k = torch.randn(3, 4, 10, 8, dtype=torch.float64), torch.randn(3, 4, 10, 8, dtype=torch.float64)
    real = torch.tensor([[True] * 10, [True] * 6 + [False] * 4, [True] * 2 + [False] * 8])
    mask, expected = _with_padding(q, k, real)
    if kind == "float":
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    scores = received_attention(q, k, attn_mask=mask, chunk=chunk)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(scores.sum(-1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(received_attention(q, k, chunk=chunk), _full_map(q, k, 8**-0.5).mean(dim=(1, 2)))


def test_received_attention_never_builds_the_full_map():
    q, k = torch.randn(2, 6, 300, 16), torch.randn(2, 6, 300, 16)
    counter = MacCounter()
    with counter:
        received_attention(q, k, chunk=128)
    assert counter.total == 2 * 6 * 300 * 300 * 16  # the logits, once; the peak map is [B, H, 128, N]


def test_received_attention_from_probs_leaves_padding_out():
    q, k = torch.randn(2, 3, 7, 4, dtype=torch.float64), torch.randn(2, 3, 7, 4, dtype=torch.float64)
    real = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    mask, expected = _with_padding(q, k, real)
    torch.testing.assert_close(received_attention_from_probs(_full_map(q, k, 0.5, mask)), expected)


def test_size_weighted_mean_counts_each_row_for_its_patches_and_leaves_padding_out():
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    size = torch.tensor([[1.0, 3.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)[..., None]
    expected = torch.stack([(x[0, 0] + 3 * x[0, 1]) / 4, x[1].mean(0)])
    torch.testing.assert_close(size_weighted_mean(x, size), expected)
    assert size_weighted_mean(x, size, keepdim=True).shape == (2, 1, 3)


def test_class_attention_from_probs_averages_heads():
    probs = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(class_attention_from_probs(probs), probs[:, :, 0].mean(1))


def test_gather_tokens_takes_each_images_rows_from_strided_tokens_with_gradients():
    qkv = torch.randn(3, 7, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    q = qkv.permute(2, 0, 3, 1, 4)[0].transpose(1, 2)  # [B, N, H, d], not contiguous, as a model's queries
    index = torch.tensor([[0, 6, 2], [5, 5, 1], [3, 0, 4]])
    expected = torch.stack([q[b, index[b]] for b in range(3)])
    torch.testing.assert_close(gather_tokens(q, index), expected, atol=0, rtol=0)
    gather_tokens(q, index).sum().backward()
    assert qkv.grad[1, 5, 0].eq(2).all() and qkv.grad[1, 0].eq(0).all() and qkv.grad[:, :, 1:].eq(0).all()


def test_add_rows_sums_repeated_destinations_per_image_into_strided_targets():
    x = torch.randn(2, 8, 5, dtype=torch.float64)
    target, source = x[:, 1::2], torch.randn(2, 3, 5, dtype=torch.float64)
    index = torch.tensor([[0, 0, 3], [2, 1, 2]])
    expected = target.clone()
    for b in range(2):
        for k in range(3):
            expected[b, index[b, k]] += source[b, k]
    torch.testing.assert_close(add_rows(target, index, source), expected)
    assert torch.equal(x[:, 1::2], target)  # the target is not changed in place


def test_kept_tokens_match_evit_counts_for_deit_small():
    assert [evit_kept_tokens(196, r) for r in (0.9, 0.7, 0.5)] == [177, 138, 98]
    assert evit_kept_tokens(196, 1.0) == 196


def _example():
    # one image, prefix token 0, five candidates with distinct scores
    x = torch.arange(6, dtype=torch.float64).view(1, 6, 1).expand(1, 6, 2).clone()
    scores = torch.tensor([[0.5, 0.05, 0.3, 0.1, 0.25, 0.2]], dtype=torch.float64)
    return x, scores


def test_evit_select_keeps_prefix_then_top_tokens_by_score_then_fuses_the_rest():
    x, scores = _example()
    out = evit_select(x, scores, keep_rate=0.6, num_prefix=1, fuse=True)  # keeps ceil(0.6 * 5) = 3
    assert out.shape == (1, 5, 2)
    assert out[0, :4, 0].tolist() == [0.0, 2.0, 4.0, 5.0]  # prefix, then scores 0.3, 0.25, 0.2
    fused = 0.05 * 1 + 0.1 * 3  # raw class attention of the dropped tokens 1 and 3
    assert out[0, 4, 0].item() == pytest.approx(fused)


def test_topk_select_drops_without_fusing():
    x, scores = _example()
    out = evit_select(x, scores, keep_rate=0.6, num_prefix=1, fuse=False)
    assert out[0, :, 0].tolist() == [0.0, 2.0, 4.0, 5.0]


def test_two_prefix_tokens_are_kept_even_with_low_scores():
    x, scores = _example()
    scores[0, 1] = -1.0
    out = evit_select(x, scores, keep_rate=0.25, num_prefix=2, fuse=False)
    assert out[0, :, 0].tolist() == [0.0, 1.0, 2.0]


def test_keeping_everything_returns_the_input():
    x, scores = _example()
    assert evit_select(x, scores, keep_rate=1.0, num_prefix=1, fuse=True) is x
    assert math.ceil(0.99 * 5) == 5 and evit_select(x, scores, 0.99, 1, True) is x


def test_topk_rows_are_the_prefix_then_the_top_scores_or_every_row_in_order():
    _, scores = _example()
    assert topk_rows(scores, keep_rate=0.6, num_prefix=1).tolist() == [[0, 2, 4, 5]]
    assert topk_rows(scores, keep_rate=0.25, num_prefix=2).tolist() == [[0, 1, 2]]
    assert topk_rows(scores, keep_rate=1.0, num_prefix=1).tolist() == [[0, 1, 2, 3, 4, 5]]


def _two_groups_and_an_outlier() -> torch.Tensor:
    """Points ``[1, 15, 1]``: a group around 0, a tighter one around 10, and one point at 30."""
    offsets = [0.0, 0.1, -0.1, 0.3, -0.3, 0.6, -0.6]
    return torch.tensor(offsets + [10 + o / 2 for o in offsets] + [30.0], dtype=torch.float64).view(1, -1, 1)


def test_dpc_knn_centres_are_the_density_peaks_where_farthest_points_take_the_outlier():
    points = _two_groups_and_an_outlier()
    weights = torch.ones(1, 15, dtype=torch.float64)
    centres, assign = dpc_knn(points, weights, 2)
    assert centres.tolist() == [[7, 0]]  # the tighter group's peak (the densest point) first, then the other's
    assert assign.tolist() == [[1] * 7 + [0] * 8]  # the outlier joins its nearest centre
    seeds, assign = farthest_point_seeds(points, weights, 2)
    assert seeds.tolist() == [[14, 6]]  # the point farthest from the mean, then the one farthest from it
    assert assign.tolist() == [[1] * 14 + [0]]


def test_lloyd_steps_move_centroids_to_their_members_and_padding_centres_take_no_rows():
    points = torch.tensor([[[0.0], [10.0], [0.1], [10.1], [0.2], [10.2], [4.0], [5.0]]])
    weights = torch.tensor([[1.0] * 7 + [0.0]])  # the last row is padding, and the third centre
    centres, start = torch.tensor([[0, 2, 7]]), torch.tensor([[0, 1, 1, 1, 1, 1, 1, 2]])
    assert lloyd(points, weights, centres, start, 0).tolist() == start.tolist()
    assign = lloyd(points, weights, centres, start, 2)
    assert assign[0, :7].tolist() == [0, 1, 0, 1, 0, 1, 0]  # 4.0 never joins the padding centre at 5.0


@pytest.mark.parametrize("clustering", ["dpc", "kmeans"])
def test_a_cluster_of_identical_keys_attends_exactly_as_its_members(clustering):
    torch.manual_seed(0)
    q = torch.randn(2, 2, 9, 4, dtype=torch.float64)
    k = torch.randn(2, 2, 5, 4, dtype=torch.float64).repeat_interleave(2, dim=2)[:, :, 1:]  # prefix + 4 pairs
    v = torch.randn(2, 2, 9, 4, dtype=torch.float64)
    dense = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(clustered_attention(q, k, v, (4,), 1, clustering, 0), dense, atol=1e-12, rtol=0)


@pytest.mark.parametrize("clustering", ["dpc", "kmeans"])
def test_under_a_bias_per_query_and_head_a_cluster_of_identical_tokens_attends_exactly_as_its_members(clustering):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 4, dtype=torch.float64)
    k, v = (torch.randn(2, 4, 5, 4, dtype=torch.float64).repeat_interleave(2, dim=2)[:, :, 1:] for _ in range(2))
    bias = torch.randn(1, 4, 9, 9, dtype=torch.float64) * 3  # as a relative position bias: the same for each image
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    for scales in ((4,), (4, 4)):
        torch.testing.assert_close(clustered_attention(q, k, v, scales, 1, clustering, 0, attn_mask=bias), dense,
                                   atol=1e-12, rtol=0)
    sizes = torch.tensor([1.0, 2, 2, 3, 3, 1, 1, 4, 4], dtype=torch.float64)  # sizes weight the means, as ToMe's
    sized = F.scaled_dot_product_attention(q, k, v, attn_mask=bias + sizes.log())
    clustered = clustered_attention(q, k, v, (4,), 1, clustering, 0, attn_mask=bias + sizes.log(),
                                    key_mask=sizes.log()[None, None, None])
    torch.testing.assert_close(clustered, sized, atol=1e-12, rtol=0)


@pytest.mark.parametrize("clustering", ["dpc", "kmeans"])
def test_padded_groups_in_an_explicit_softmax_equal_the_fused_multi_scale_attention(clustering):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 17, 8, dtype=torch.float64) for _ in range(3))
    keys, values, bias = padded_cluster_keys_values(k, v, (3, 8), 1, clustering, 2)
    explicit = ((q @ keys.transpose(-2, -1)) * 8**-0.5 + bias).softmax(-1) @ values
    torch.testing.assert_close(explicit, clustered_attention(q, k, v, (3, 8), 1, clustering, 2), atol=1e-12, rtol=0)


def _padded(real: list[int], tokens: int) -> torch.Tensor:
    """Sizes ``[B, tokens, 1]``: image ``b`` has ``real[b]`` tokens of its own (size 1), then padding (size 0)."""
    return (torch.arange(tokens) < torch.tensor(real).unsqueeze(1)).to(torch.float64).unsqueeze(-1)


def test_topk_rows_keep_each_images_own_share_then_its_padding_rows():
    scores = torch.tensor([[1.0, 0.1, 0.9, 0.3, 0.8, 0.2, 0.7], [1.0, 0.1, 0.9, 0.3, 0.8, 0.2, 0.7]])
    rows = topk_rows(scores, keep_rate=0.5, num_prefix=1, size=_padded([7, 4], 7))
    # image 0: ceil(0.5 · 6) = 3 of its 6 tokens; image 1: ceil(0.5 · 3) = 2 of its 3 (rows 1-3), then padding row 4
    assert rows.tolist() == [[0, 2, 4, 6], [0, 2, 3, 4]]


def test_evit_select_puts_each_images_fused_token_right_after_its_own_kept_tokens():
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    scores = torch.tensor([[0.3, 0.1, 0.2, 0.05, 0.15, 0.12, 0.08]] * 2, dtype=torch.float64)
    size = _padded([7, 4], 7)
    out = evit_select(x, scores, 0.5, 1, True, size)
    assert out.shape == (2, 5, 3)
    alone = evit_select(x[1:, :4], scores[1:, :4], 0.5, 1, True)  # image 1 alone: class, 2 kept, fused
    torch.testing.assert_close(out[1, :4], alone[0])
    sizes = evit_select_sizes(size, scores, 0.5, 1, True, size=size)
    assert sizes[:, :, 0].tolist() == [[1, 1, 1, 1, 3], [1, 1, 1, 1, 0]]


def test_padded_tome_merge_gives_each_image_its_own_merge_then_padding():
    x, keys = torch.randn(1, 9, 4, dtype=torch.float64), torch.randn(1, 2, 9, 5, dtype=torch.float64)
    alone, alone_size = tome_merge(x, None, keys, 3, 1)
    padded_x = torch.cat([x, torch.randn(1, 4, 4, dtype=torch.float64)], dim=1)
    padded_keys = torch.cat([keys, torch.randn(1, 2, 4, 5, dtype=torch.float64)], dim=2)
    merged, size = tome_merge(padded_x, _padded([9], 13), padded_keys, 3, 1, padded=True)
    assert merged.shape == (1, 10, 4)  # 13 − min(3, 12 // 2) rows: its own 9 − 3 = 6, then padding
    torch.testing.assert_close(merged[:, :6], alone)
    torch.testing.assert_close(size[:, :6], alone_size)
    assert size[0, 6:].abs().sum() == 0 and merged[0, 6:].abs().sum() == 0


def _index(batch: int, tokens: int) -> torch.Tensor:
    return torch.arange(tokens, dtype=torch.float64).expand(batch, tokens)[..., None]


def test_a_tome_merge_takes_its_destinations_position_padded_or_alone():
    keys = torch.randn(2, 2, 11, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    positions = tome_merge_positions(_index(2, 11), None, keys, 3, 1)
    unmerged, _, _ = bipartite_matching(keys.mean(1), 3, 1)
    destinations = torch.arange(1, 11, 2).expand(2, 5)  # B rows stay in place; merged A rows are gone
    assert positions[..., 0].long().tolist() == torch.cat([2 * unmerged, destinations], 1).tolist()
    padded = torch.cat([_index(2, 11), torch.full((2, 4, 1), -1.0, dtype=torch.float64)], 1)
    padded_keys = torch.cat([keys, torch.randn(2, 2, 4, 5, dtype=torch.float64)], 2)
    size = _padded([11, 11], 15)
    together = tome_merge_positions(padded, size, padded_keys, 3, 1, padded=True)
    assert torch.equal(together[:, :8], positions) and (together[:, 8:] == -1).all()


def test_evits_fused_token_takes_the_position_of_its_heaviest_dropped_token():
    scores = torch.tensor([[0.3, 0.1, 0.2, 0.05, 0.15, 0.12, 0.08]] * 2, dtype=torch.float64)
    size = _padded([7, 4], 7)
    positions = evit_select_positions(_index(2, 7), scores, 0.5, 1, True)
    assert positions[..., 0].tolist() == [[0, 2, 4, 5, 1], [0, 2, 4, 5, 1]]  # kept 2, 4, 5; heaviest dropped: 1
    padded = evit_select_positions(_index(2, 7).masked_fill(size == 0, -1), scores, 0.5, 1, True, size)
    assert padded[..., 0].tolist() == [[0, 2, 4, 5, 1], [0, 2, 1, 3, -1]]  # image 1: kept 2, 1; fused 3; padding


def test_size_bias_without_proportional_attention_only_masks_padding():
    size = torch.tensor([[[1.0], [3.0], [0.0]]], dtype=torch.float64)
    assert size_bias(size, None, size).flatten().tolist() == [0.0, math.log(3.0), -math.inf]
    assert size_bias(size, None, size, proportional=False).flatten().tolist() == [0.0, 0.0, -math.inf]


def test_a_pool_query_attends_only_to_the_tokens_a_keep_policy_keeps():
    logits = torch.randn(2, 3, 1, 5, dtype=torch.float64)
    policy = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)[..., None]
    probs = softmax_with_policy(logits, policy, eps=0.0)
    expected = logits.masked_fill(policy[:, None, None, :, 0] == 0, float("-inf")).softmax(-1)
    torch.testing.assert_close(probs, expected)


@pytest.mark.parametrize("heads", [[0, 2, 3], [1], [], [0, 1, 2, 3]])
def test_layers_on_some_heads_equal_the_full_layer_with_the_other_heads_zeroed(heads):
    from fxprune.ops.gating import project_from_heads, project_head_channels

    torch.manual_seed(0)
    num_heads, head_dim, batch, rows = 4, 3, 2, 5
    weight, bias = torch.randn(7, num_heads * head_dim, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    x = torch.randn(batch, rows, num_heads * head_dim, dtype=torch.float64)
    factor = torch.rand(batch, 1, len(heads) * head_dim, dtype=torch.float64)
    used = torch.tensor(heads, dtype=torch.long)
    channels = [c for h in heads for c in range(h * head_dim, (h + 1) * head_dim)]
    zeroed = torch.zeros_like(x)
    zeroed[..., channels] = x[..., channels] * factor
    used_macs = batch * rows * len(channels) * weight.shape[0]  # the products on the used channels, all counted
    with MacCounter() as counter:
        got = project_head_channels(x, weight, bias, used, head_dim, factor)
    assert counter.total == used_macs
    torch.testing.assert_close(got, F.linear(zeroed, weight, bias))
    table = tuple(tuple(range(h * head_dim, (h + 1) * head_dim)) for h in range(num_heads))
    per_head = x.view(batch, rows, num_heads, head_dim).transpose(1, 2).index_select(1, used)
    zeroed = torch.zeros_like(x)
    zeroed[..., channels] = x[..., channels]
    with MacCounter() as counter:
        got = project_from_heads(per_head, weight, bias, table, used)
    assert counter.total == used_macs
    torch.testing.assert_close(got, F.linear(zeroed, weight, bias))


def test_one_channel_table_serves_every_head_set_in_turn():
    from fxprune.ops.gating import project_from_heads

    torch.manual_seed(0)
    weight, bias = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    table = tuple(tuple(range(h * 3, (h + 1) * 3)) for h in range(4))  # one object, as a graph's constant
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64)
    for heads in ([0, 2, 3], [1], [0, 1, 2, 3], [1], [0, 2, 3], []):
        used = torch.tensor(heads, dtype=torch.long)
        zeroed = torch.zeros(2, 5, 12, dtype=torch.float64)
        for h in heads:
            zeroed[..., h * 3:(h + 1) * 3] = x[:, h]
        got = project_from_heads(x.index_select(1, used), weight, bias, table, used)
        torch.testing.assert_close(got, F.linear(zeroed, weight, bias))


def test_the_order_computed_for_export_is_the_stable_sort_whatever_the_ties(monkeypatch):
    from fxprune.ops import ordering

    values = torch.tensor([[3.0, 1.0, 3.0, float("-inf"), 1.0, 2.0, 3.0], [0.0] * 7])
    cdf = torch.tensor([[0.0, 0.2, 0.2, 0.5, 1.0]]).expand(2, -1).contiguous()
    points = torch.tensor([[0.0, 0.2, 0.3, 1.0, 1.5]]).expand(2, -1).contiguous()
    eager = [ordering.stable_argsort(values, descending) for descending in (False, True)]
    below = ordering.count_below(cdf, points)
    monkeypatch.setattr(ordering, "_exporting", lambda: True)
    for descending, expected in zip((False, True), eager):
        assert torch.equal(ordering.stable_argsort(values, descending), expected)
    assert torch.equal(ordering.count_below(cdf, points), below)
    assert eager[1][0].tolist() == [0, 2, 6, 5, 1, 4, 3]  # ties by lower index


@pytest.mark.parametrize("shape", [(2, 6, 5), (1, 2, 6, 5), (3, 1, 6, 5), (3, 2, 6, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bool])
def test_a_masks_query_rows_are_gathered_per_image_whatever_its_leading_dimensions(shape, dtype):
    from fxprune.ops import gather_mask_rows

    generator = torch.Generator().manual_seed(0)
    mask = torch.randn(shape, generator=generator, dtype=torch.float64)
    mask = mask > 0 if dtype is torch.bool else mask
    index = torch.tensor([[0, 3, 5], [2, 2, 1], [4, 0, 3]])
    full = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(3, -1, -1, -1)
    expected = torch.stack([full[b][:, index[b]] for b in range(3)])  # [3, H, 3, 5]
    assert torch.equal(gather_mask_rows(mask, index), expected)
