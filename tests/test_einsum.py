import pytest
import torch
from torch import nn
from vits import assert_each_image_gets_what_it_gets_alone, hand_written_vit, image_batch

import fxprune
from fxprune.capture.einsum import _as_product


@pytest.mark.parametrize(("equation", "named", "expected"), [
    ("bhid,bhjd->bhij", False, True),  # q @ kᵀ
    ("bhij,bhjd->bhid", False, False),  # a @ v
    ("b h i d, b h j d -> b h i j", True, True),  # einops' names
    ("bhid,bhjd->bhji", False, None),  # the product transposed
    ("bhid,bhid->bhi", False, None),  # a row-wise product
    ("...id,...jd->...ij", False, True),  # leading axes as an ellipsis
    ("... i j, ... j d -> ... i d", True, False),  # einops' names, an ellipsis
    ("b...id,b...jd->b...ij", False, None),  # an ellipsis after a leading axis: broadcast otherwise
    ("...id,...jd->ij", False, None),  # summed over the leading axes
    ("bhid,bjd->bhij", False, None),  # other leading axes
])
def test_an_einsum_is_a_matrix_product_only_on_the_same_leading_axes(equation, named, expected):
    assert _as_product([None, None], equation, named) is expected


class _EinsumMixer(nn.Module):
    """Multi-head self-attention whose products are ``torch.einsum`` calls."""

    def __init__(self, mixer: nn.Module, scores: str, mixing: str):
        super().__init__()
        self.mixer, self.scores, self.mixing = mixer, scores, mixing

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q, k, v = self.mixer.split(tokens)
        weights = (torch.einsum(self.scores, q, k) * q.shape[-1] ** -0.5).softmax(dim=-1)
        mixed = torch.einsum(self.mixing, weights, v)
        return self.mixer.out(mixed.transpose(1, 2).reshape(tokens.shape))


@pytest.mark.parametrize(
    "equations", [("bhid,bhjd->bhij", "bhij,bhjd->bhid"), ("...id,...jd->...ij", "...ij,...jd->...id")],
    ids=["letters", "ellipsis"],
)
def test_attention_written_with_einsum_is_found_and_rewritten(equations):
    model = hand_written_vit()
    for stage in model.stages:
        stage.mix = _EinsumMixer(stage.mix, *equations)
    assert all(block.reducible for block in fxprune.analyse(model).blocks)  # before: "found no attention"
    x = image_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(fxprune.transform(model, fxprune.EViT(1.0, (1, 2)))(x), model(x), atol=1e-5, rtol=0)
    assert_each_image_gets_what_it_gets_alone(fxprune.transform(model, fxprune.EViT(0.5, (1, 2))), x)
