"""The layout ops of skipping (``fxprune.ops.gating``): one row for a sub-layer that uses no head, added at every
used row."""

import torch

from fxprune.ops.gating import add_used_rows, one_row_without_heads, used_layout


def _decisions():
    """Row decisions ``[3, 6, 1]`` (each image a different count) and sub-layer decisions ``[3, 2]`` (image 1 does
    not use the MLP)."""
    rows = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 1]], dtype=torch.bool)[..., None]
    sublayers = torch.tensor([[True, True], [True, False], [False, True]])
    return rows, sublayers


def test_without_heads_one_row_is_computed_and_added_at_every_used_row_of_every_image_that_uses_the_sub_layer():
    rows, sublayers = _decisions()
    layout = used_layout(rows, sublayers, 1)
    images, index, valid = one_row_without_heads(torch.zeros(0, dtype=torch.long), *layout)
    assert images.tolist() == [0] and index.tolist() == [[0]] and valid.tolist() == [[True]]
    residual, row = torch.randn(3, 6, 4), torch.randn(1, 1, 4)
    expected = residual.clone()
    for image in (0, 2):  # the images that use the MLP, at their used rows
        expected[image, rows[image, :, 0]] += row[0, 0]
    torch.testing.assert_close(add_used_rows(residual, row, *layout), expected)
    alone = used_layout(rows[2:], sublayers[2:], 1)  # one image: no padding, no images named
    torch.testing.assert_close(add_used_rows(residual[2:], row, *alone), expected[2:])


def test_with_a_head_used_or_no_image_using_the_sub_layer_the_layout_is_kept():
    rows, sublayers = _decisions()
    layout = used_layout(rows, sublayers, 1)
    assert one_row_without_heads(torch.tensor([2]), *layout) == layout
    assert one_row_without_heads(None, *layout) == layout
    nobody = used_layout(rows, torch.zeros(3, 2, dtype=torch.bool), 1, empty=True)
    assert nobody[0].numel() == 0 and one_row_without_heads(torch.zeros(0, dtype=torch.long), *nobody) == nobody
