"""Where each stream function sends its input rows (``fxprune.ops.restoring``): the rule each built-in stream
function declares gives what its result on the identity over its input rows gives."""

import pytest
import timm
import torch

import fxprune
from fxprune.ops import ROWS, ats_pad, evit_select, op_of, tome_merge
from fxprune.ops.restoring import follow_rows, heaviest_rows, row_identity
from fxprune.ops.selection import gather_tokens

_SEED = torch.Generator().manual_seed(0)


def _sizes(real: list[int], tokens: int) -> torch.Tensor:
    """Sizes ``[B, tokens, 1]``: image ``b`` has ``real[b]`` tokens (size 1), then padding (size 0)."""
    return (torch.arange(tokens) < torch.tensor(real).unsqueeze(1)).to(torch.float64).unsqueeze(-1)


def _declared(fn, *args, **kwargs) -> torch.Tensor:
    return op_of(fn).follows_with(ROWS)(*args, **kwargs)


def _destinations_by_row_map(fn, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    mapped = fn(row_identity(x), *args, **kwargs)
    return heaviest_rows(mapped[0] if op_of(fn).sized else mapped)


def _cases():
    x = torch.randn(2, 13, 4, dtype=torch.float64, generator=_SEED)
    keys = torch.randn(2, 2, 13, 3, dtype=torch.float64, generator=_SEED)
    scores = torch.rand(2, 13, dtype=torch.float64, generator=_SEED)
    padded = _sizes([13, 8], 13)
    index = torch.tensor([[0, 5, 2, 9], [0, 3, 1, 1]])  # image 1: its last slot repeats a row (ATS padding)
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    cases = {"gather": (gather_tokens, x, (index,), {}),
             "ats padding": (ats_pad, x[:, :4], (None, index, valid), {})}
    for prefix in (0, 1, 2):
        cases[f"tome, {prefix} prefix"] = (tome_merge, x, (None, keys, 4, prefix), {})
        cases[f"tome padded, {prefix} prefix"] = (tome_merge, x, (padded, keys, 4, prefix), {"padded": True})
    for fuse in (False, True):
        cases[f"evit fuse={fuse}"] = (evit_select, x, (scores, 0.5, 1, fuse), {})
        cases[f"evit fuse={fuse} padded"] = (evit_select, x, (scores, 0.5, 1, fuse), {"size": padded})
    return cases


@pytest.mark.parametrize("case", list(_cases()))
def test_each_stream_functions_declared_destinations_are_the_heaviest_rows_of_its_row_map(case):
    fn, x, args, kwargs = _cases()[case]
    declared = _declared(fn, x, *args, **kwargs)
    expected = _destinations_by_row_map(fn, x, *args, **kwargs)
    if fn is evit_select:  # the fused token stands for no dropped token: the row map of the kept rows alone
        expected = _destinations_by_row_map(fn, x, *args[:-1], False, **kwargs)
    assert declared.tolist() == expected.tolist()


def test_following_two_stream_functions_in_turn_equals_following_their_composed_row_map():
    x = torch.randn(2, 9, 3, dtype=torch.float64, generator=_SEED)
    index = torch.tensor([[0, 4, 2, 7], [0, 6, 1, 1]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    held = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [0, -1, 2, 1, 4, 5, 6, -1, 8]])
    kept = gather_tokens(x, index)
    in_turn = follow_rows(follow_rows(held, _declared(gather_tokens, x, index)),
                          _declared(ats_pad, kept, None, index, valid))
    composed = ats_pad(gather_tokens(row_identity(x), index), None, index, valid)[0]
    assert in_turn.tolist() == follow_rows(held, heaviest_rows(composed)).tolist()
    assert in_turn[1].tolist() == [0, -1, -1, 2, -1, -1, 1, -1, -1]


def test_a_stream_function_that_declares_no_destinations_is_followed_through_its_row_map(monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                              num_classes=0, global_pool="").eval().double()  # its output: every token
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=_SEED)
    policy = fxprune.TopK(0.5, (1, 2))
    declared = fxprune.transform(model, policy)
    monkeypatch.delitem(op_of(gather_tokens).follow, ROWS)
    by_row_map = fxprune.transform(model, policy)
    assert "row_identity" in by_row_map.code and "row_identity" not in declared.code
    with torch.no_grad():
        torch.testing.assert_close(by_row_map(x), declared(x), atol=0, rtol=0)
