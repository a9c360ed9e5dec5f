import pytest
import torch
from torch import nn
from vits import image_batch

import fxprune
from fxprune.capture.layout import _swapped
from fxprune.tools.zoo import SequenceFirst, Stack


def _sequence_first(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return (SequenceFirst() if kind == "clip" else Stack(norm_first=True, batch_first=False)).eval()


@pytest.mark.parametrize("kind", ["clip", "transformer-encoder"])
def test_tokens_the_model_lays_out_sequence_first_are_laid_out_batch_first_and_its_blocks_are_reducible(kind):
    model = _sequence_first(kind)
    program = fxprune.analyse(model)  # before: every block "sequence first ([17, 2, 48]: [N, B, C] …)"
    assert [block.reducible for block in program.blocks] == [True] * 3 and program.tokens == 17
    assert any("laid out batch first" in note for note in program.trace.notes)
    x = image_batch(model, batch=3)
    gm = fxprune.trace(model)
    assert not any(_swapped(node) is not None for node in gm.graph.nodes)  # the model's swaps and its attentions'
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=0)  # at another batch size than captured


class _ImageZeroRead(nn.Module):
    """Sequence-first blocks whose tokens are read at image 0 between the swaps (``x[:, :1]``): an op that depends on
    the layout."""

    image_size = SequenceFirst.image_size

    def __init__(self):
        super().__init__()
        self.inner = SequenceFirst()

    def forward(self, images):
        inner = self.inner
        x = inner.conv1(images).flatten(2).permute(0, 2, 1)
        x = torch.cat([inner.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + inner.positional_embedding
        x = inner.resblocks(x.permute(1, 0, 2))
        return inner.proj(x + x[:, :1]).permute(1, 0, 2)[:, 0]


def test_tokens_read_in_a_way_that_depends_on_their_layout_stay_sequence_first_and_the_refusal_says_so():
    torch.manual_seed(0)
    model = _ImageZeroRead().eval()
    program = fxprune.analyse(model)
    assert not any("laid out batch first" in note for note in program.trace.notes)
    assert all("sequence first" in block.refusal for block in program.blocks)
    x = image_batch(model, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(fxprune.trace(model)(x), model(x), atol=1e-6, rtol=0)


def test_a_batch_first_model_is_captured_as_it_is():
    torch.manual_seed(0)
    program = fxprune.analyse(Stack(norm_first=True).eval())
    assert not any("laid out batch first" in note for note in program.trace.notes)


def test_a_deep_sequence_first_model_is_laid_out_batch_first():
    torch.manual_seed(0)
    program = fxprune.analyse(SequenceFirst(depth=48).eval())  # before: a RecursionError (a recursive unused-check)
    assert len(program.blocks) == 48 and all(block.reducible for block in program.blocks)
