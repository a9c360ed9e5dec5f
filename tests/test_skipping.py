"""Row sums made in place (``fxprune.passes.skipping.add_in_place``): only where nothing reads the residual's memory
afterwards, and then with the same results; shape reads from before a sub-layer follow its used layout; a block no
image uses runs its sub-layer decisions alone (``skip_unused_blocks``)."""

import operator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import fxprune
from fxprune.capture.values import fake_mode
from fxprune.methods.adavit import set_usage
from fxprune.ops.gating import add_used_rows
from fxprune.passes.skipping import add_in_place, mark_skippable, skip_unused_blocks


def _graph(read_after: bool, residual_is_input: bool = False, update_is_residual: bool = False) -> fx.GraphModule:
    """``x`` ``[2, 5, 4]`` doubled, then two row sums of ``u`` into it; a view of the doubled stream (its first row)
    is read after them (``read_after``) or only before, as a product."""
    graph = fx.Graph()
    x, u = graph.placeholder("x"), graph.placeholder("u")
    stream = x if residual_is_input else graph.call_function(operator.mul, (x, 2.0))
    first_row = graph.call_function(operator.getitem, (stream, (slice(None), 0)))
    summary = graph.call_function(operator.mul, (first_row, 3.0))
    update = stream if update_is_residual else u
    once = graph.call_function(add_used_rows, (stream, update, None, None, None))
    twice = graph.call_function(add_used_rows, (once, u, None, None, None))
    graph.output((twice, first_row if read_after else summary))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    mode = fake_mode()
    FakeTensorProp(gm, mode).propagate(mode.from_tensor(torch.zeros(2, 5, 4)), mode.from_tensor(torch.zeros(2, 5, 4)))
    return gm


def _in_place(gm: fx.GraphModule) -> list[bool]:
    return [node.kwargs.get("in_place", False) for node in gm.graph.find_nodes(op="call_function",
                                                                                target=add_used_rows)]


def test_row_sums_are_made_in_place_where_nothing_reads_the_residual_after_them():
    gm = _graph(read_after=False)
    x, u = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    expected = gm(x, u)
    assert add_in_place(gm) == 2 and _in_place(gm) == [True, True]
    gm.recompile()
    kept = x.clone()
    with torch.no_grad():
        got = gm(x, u)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(x, kept, atol=0, rtol=0)  # the input is not the memory summed into


def test_a_view_of_the_residual_read_afterwards_keeps_every_sum_into_that_memory_out_of_place():
    gm = _graph(read_after=True)  # the second sum would be made in the first's memory, which may be the residual's
    assert add_in_place(gm) == 0


def test_an_input_residual_or_an_update_in_the_residual_memory_keeps_the_sum_out_of_place():
    assert _in_place(_graph(read_after=False, residual_is_input=True))[0] is False
    gm = _graph(read_after=False, update_is_residual=True)
    add_in_place(gm)
    assert _in_place(gm)[0] is False


def test_a_sum_marked_in_place_copies_where_a_gradient_flows_through_it_or_its_rows_share_memory():
    residual, update = torch.randn(1, 5, 4, requires_grad=True), torch.randn(1, 5, 4)
    total = add_used_rows(residual * 1.0, update, None, None, None, in_place=True)
    total.sum().backward()
    torch.testing.assert_close(residual.grad, torch.ones_like(residual))
    expanded = torch.randn(1, 1, 4).expand(2, 5, 4)  # every row one memory location
    with torch.no_grad():
        summed = add_used_rows(expanded, torch.ones(2, 5, 4), None, None, None, in_place=True)
    torch.testing.assert_close(summed, expanded + 1)


class _ShapeFirst(nn.Module):
    """A pre-norm block that reads its input's shape before the norm (outside its attention sub-layer)."""

    def __init__(self, width: int = 32, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class _ShapeFirstViT(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.patches, self.cls_token = nn.Conv2d(3, width, 8, 8), nn.Parameter(torch.randn(1, 1, width))
        self.blocks = nn.Sequential(*[_ShapeFirst(width) for _ in range(3)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patches(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.head(self.norm(self.blocks(x))[:, 0])


def test_a_shape_read_before_a_skipped_sub_layer_follows_its_axis_when_the_batch_equals_the_token_count():
    torch.manual_seed(0)
    model, x = _ShapeFirstViT().eval(), torch.randn(3, 3, 32, 32)
    captured = torch.randn(17, 3, 32, 32)  # 17 tokens: B and N read before the sub-layer have one value
    skipping = fxprune.transform(model, fxprune.AdaViT(0.5, init_logit=0.0), example_inputs=captured)
    set_usage(skipping, x, 0.5)  # before: refused, the token count taken for the batch
    masked = fxprune.transform(model, fxprune.AdaViT(0.5, init_logit=0.0, skip=False), example_inputs=captured)
    masked.load_state_dict(skipping.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(skipping(x), masked(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(skipping(x[1:2]), masked(x[1:2]), atol=1e-5, rtol=0)


def _block(read_after: bool) -> fx.GraphModule:
    """A block on ``x`` ``[B, N, C]``: its sub-layers used where its class token's first two channels are positive,
    two row sums (``2u``, then ``u``) into ``x``; ``2u`` is also returned (``read_after``)."""
    graph = fx.Graph()
    x, u = graph.placeholder("x"), graph.placeholder("u")
    token = graph.call_function(operator.getitem, (x, (slice(None), 0, slice(0, 2))))
    used = graph.call_function(operator.gt, (token, 0.0))
    doubled = graph.call_function(operator.mul, (u, 2.0))
    mid = graph.call_function(add_used_rows, (x, doubled, None, None, None))
    end = graph.call_function(add_used_rows, (mid, u, None, None, None))
    graph.output((end, doubled) if read_after else end)
    mark_skippable("blocks.0", used, end)
    return fx.GraphModule(torch.nn.Module(), graph)


def test_a_block_no_image_uses_returns_its_input_and_one_some_image_uses_is_computed_whole():
    gm = _block(read_after=False)
    assert skip_unused_blocks(gm) == 1
    gm.recompile()
    assert [node.op for node in gm.graph.nodes] == ["placeholder", "placeholder", "call_function", "call_function",
                                                    "get_attr", "call_function", "output"]
    x, u = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    x[:, 0, :2] = -1.0  # no image uses a sub-layer
    assert gm(x, u) is x
    with fxprune.collect():  # every block decides while decisions are collected
        torch.testing.assert_close(gm(x, u), x + 3 * u)
    x[1, 0, 1] = 1.0  # one image uses one: the block runs on the batch
    torch.testing.assert_close(gm(x, u), x + 3 * u)


def test_a_block_whose_values_are_read_after_it_is_left_in_place():
    gm = _block(read_after=True)
    assert skip_unused_blocks(gm) == 0
    assert not gm.graph.find_nodes(op="get_attr")
