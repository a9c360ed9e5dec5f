"""Where each head's channels are around an attention (``fxprune.passes.heads``), as AdaViT's skipping uses it to
compute the used heads only."""

import math

import pytest
import torch
import torch.nn.functional as F
from vits import HandWrittenViT, TokenMixer, image_batch, logits, timm_vit

import fxprune
from fxprune.methods.adavit import AdaViT, set_usage
from fxprune.ops.gating import project_heads
from fxprune.passes.skipping import calls_of


class HeadCountingMixer(TokenMixer):
    """Fused attention whose output is scaled by the number of heads its result has, read from that result."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        q, k, v = self.split(tokens)
        o = F.scaled_dot_product_attention(q, k, v)
        heads = o.shape[1]
        return self.out(o.transpose(1, 2).reshape(b, n, c)) * (heads / self.heads)


def _vit_with(mixer: type[TokenMixer], depth: int = 3, train: bool = False) -> HandWrittenViT:
    """The hand-written ViT (float64, evaluation mode unless ``train``) with ``mixer`` as every block's attention."""
    torch.manual_seed(0)
    model = HandWrittenViT(depth=depth)
    for stage in model.stages:
        stage.mix = mixer(48, 3)
    return model.double().train(train)


def _sliced(gm: torch.nn.Module) -> int:
    """How many head-sliced q, k, v products ``gm``'s graphs (its own and those moved apart) make."""
    return len(calls_of(gm, project_heads))


def _skipping_equals_masked(model: HandWrittenViT) -> torch.nn.Module:
    """``model`` with AdaViT skipping, at a random usage, checked against the masked graph on three images."""
    masked, skipping = fxprune.transform(model, AdaViT(0.5, skip=False)), fxprune.transform(model, AdaViT(0.5))
    x = image_batch(model, batch=3, dtype=torch.float64)
    with torch.no_grad():
        set_usage(skipping, x, 0.5)
        masked.load_state_dict(skipping.state_dict())
        torch.testing.assert_close(logits(skipping(x)), logits(masked(x)), atol=1e-10, rtol=0)
    return skipping


def test_heads_are_cut_from_the_projections_where_the_attention_output_is_only_rearranged_for_them():
    class Mixer(TokenMixer):
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            b, n, c = tokens.shape
            q, k, v = self.split(tokens)
            o = F.scaled_dot_product_attention(q, k, v)
            return self.out(o.transpose(1, 2).reshape(*o.shape[:1], n, c))  # reads the output's shape: a rearrangement

    skipping = _skipping_equals_masked(_vit_with(Mixer))
    assert _sliced(skipping) == 2  # blocks 1 and 2


def test_heads_are_not_cut_where_something_else_reads_how_many_heads_the_attention_output_has():
    skipping = _skipping_equals_masked(_vit_with(HeadCountingMixer))
    assert _sliced(skipping) == 0


def test_heads_are_cut_around_an_explicit_attention_that_computes_each_head_apart():
    skipping = _skipping_equals_masked(_vit_with(TokenMixer))  # softmax(q @ kᵀ / √d) @ v written out
    assert _sliced(skipping) == 2


class TemperedMixer(TokenMixer):
    """Explicit attention whose logits are scaled by a learned temperature per head: the heads are not apart."""

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads)
        self.temperature = torch.nn.Parameter(torch.linspace(0.5, 2.0, heads).view(heads, 1, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        q, k, v = self.split(tokens)
        weights = torch.softmax(q @ k.transpose(-2, -1) * self.temperature, dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, n, c))


class MapCountingMixer(TokenMixer):
    """Explicit attention whose output is scaled by the number of heads its attention map has, read from the map."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        q, k, v = self.split(tokens)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // self.heads), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, n, c)) * (weights.shape[1] / self.heads)


@pytest.mark.parametrize("mixer", [TemperedMixer, MapCountingMixer], ids=["parameter-per-head", "map-read-elsewhere"])
def test_heads_are_not_cut_where_the_attention_mixes_them_or_is_read_elsewhere(mixer):
    assert _sliced(_skipping_equals_masked(_vit_with(mixer))) == 0


class NormedMixer(TokenMixer):
    """Explicit attention with a layer norm over each head's query channels (a module call in the graph)."""

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads)
        self.q_norm = torch.nn.LayerNorm(width // heads)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        q, k, v = self.split(tokens)
        weights = torch.softmax(self.q_norm(q) @ k.transpose(-2, -1) / math.sqrt(c // self.heads), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, n, c))


class BatchNormedMixer(NormedMixer):
    """:class:`NormedMixer` with a batch norm over the heads' queries, whose running statistics a run in training
    mode changes."""

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads)
        self.q_norm = torch.nn.BatchNorm2d(heads)


def test_finding_the_heads_runs_no_module_of_the_model_that_has_hooks_on_its_values():
    model = _vit_with(NormedMixer, depth=4)
    seen = []
    model.stages[2].mix.q_norm.register_forward_hook(lambda module, inputs, output: seen.append(output))
    sliced = _sliced(fxprune.transform(model, AdaViT(0.5)))
    assert seen and not any(type(value) is torch.Tensor for value in seen)  # tracing shows it fake values only
    assert sliced == 2  # blocks 1 and 3; block 2's norm, hooked, is not run to find whether its heads are apart
    assert _sliced(_skipping_equals_masked(model)) == 2


def test_finding_the_heads_does_not_run_a_module_with_buffers_of_a_model_in_training_mode():
    model = _vit_with(BatchNormedMixer, train=True)
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    fxprune.transform(model, AdaViT(0.5))
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, before[name], atol=0, rtol=0)


def test_a_model_made_on_the_meta_device_gets_the_graph_that_slices_its_heads():
    with torch.device("meta"):  # a model made without memory, its weights loaded later
        empty = timm_vit("deit_small_patch16_224", qk_norm=True)
    made = fxprune.transform(empty, AdaViT(0.5))  # before: the check that heads are computed apart failed on meta
    model = timm_vit("deit_small_patch16_224", qk_norm=True)
    expected = fxprune.transform(model, AdaViT(0.5))
    assert made.code == expected.code and _sliced(made) == _sliced(expected) > 0
    made = made.to_empty(device="cpu")
    made.load_state_dict(expected.state_dict())
    x = image_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(logits(made(x)), logits(expected(x)), atol=0, rtol=0)
