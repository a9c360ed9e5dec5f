import pytest
import torch
from torch._dynamo.testing import CompileCounter
from vits import hf_vit, image_batch, timm_vit

import fxprune
from fxprune import EViT, FxPruneError


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_hugging_face_model_compiles_as_one_graph():
    model = hf_vit()
    counter = CompileCounter()
    lowered = fxprune.lower(fxprune.transform(model, EViT(0.5, (1,))), backend=counter)
    for batch in (2, 5):
        out = lowered(image_batch(model, batch=batch))
        assert out.logits.shape == (batch, 10)
    assert counter.frame_count == 1


def test_inputs_given_by_name_compile_once_for_every_batch():
    model = hf_vit()
    arguments = {"pixel_values": image_batch(model), "labels": torch.tensor([1, 7, 3])}
    gm = fxprune.transform(model, EViT(0.5, (1,)), example_inputs=arguments)
    counter = CompileCounter()
    lowered = fxprune.lower(gm, backend=counter)
    for batch in (2, 5):
        x, labels = image_batch(model, batch=batch), torch.arange(batch)
        with torch.no_grad():
            torch.testing.assert_close(lowered(labels=labels, pixel_values=x).loss, gm(x, labels).loss)
    assert counter.frame_count == 1


def test_lowering_always_uses_fullgraph():
    with pytest.raises(FxPruneError, match="fullgraph=True"):
        fxprune.lower(timm_vit("vit_tiny_patch16_224", depth=1), fullgraph=False)
