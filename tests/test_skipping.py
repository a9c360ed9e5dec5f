"""Row sums made in place (``fxprune.passes.skipping.add_in_place``): only where nothing reads the residual's memory
afterwards, and then with the same results."""

import operator

import torch
import torch.fx as fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxprune.capture.values import fake_mode
from fxprune.ops.gating import add_used_rows
from fxprune.passes.skipping import add_in_place


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
