"""Where each head's channels are around an attention (``fxprune.passes.heads``), as AdaViT's skipping uses it to
compute the used heads only."""

import torch
import torch.nn.functional as F
from vits import HandWrittenViT, TokenMixer, image_batch, logits

import fxprune
from fxprune.methods.adavit import AdaViT, set_usage
from fxprune.ops.gating import project_heads


class HeadCountingMixer(TokenMixer):
    """Fused attention whose output is scaled by the number of heads its result has, read from that result."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in self.to_qkv(tokens).chunk(3, -1))
        o = F.scaled_dot_product_attention(q, k, v)
        heads = o.shape[1]
        return self.out(o.transpose(1, 2).reshape(b, n, c)) * (heads / self.heads)


def _fused_vit(mixer: type[TokenMixer]) -> HandWrittenViT:
    """The hand-written ViT (three blocks, float64) with ``mixer`` as every block's attention."""
    torch.manual_seed(0)
    model = HandWrittenViT(depth=3)
    for stage in model.stages:
        stage.mix.__class__ = mixer
    return model.double().eval()


def _sliced(gm: torch.nn.Module) -> int:
    """How many head-sliced q, k, v products ``gm``'s graphs (its own and those moved apart) make."""
    return sum(len(part.graph.find_nodes(op="call_function", target=project_heads)) for part in gm.modules()
               if isinstance(part, torch.fx.GraphModule))


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
            q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2)
                       for t in self.to_qkv(tokens).chunk(3, -1))
            o = F.scaled_dot_product_attention(q, k, v)
            return self.out(o.transpose(1, 2).reshape(*o.shape[:1], n, c))  # reads the output's shape: a rearrangement

    skipping = _skipping_equals_masked(_fused_vit(Mixer))
    assert _sliced(skipping) == 2  # blocks 1 and 2


def test_heads_are_not_cut_where_something_else_reads_how_many_heads_the_attention_output_has():
    skipping = _skipping_equals_masked(_fused_vit(HeadCountingMixer))
    assert _sliced(skipping) == 0
