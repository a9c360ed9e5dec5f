"""Small ViTs for the tests: timm, torchvision, Hugging Face and a hand-written one, random weights."""

from __future__ import annotations

import io
import math

import timm
import torch
import torchvision
from torch import nn

# the timm models the issue names, at test size (their architecture, fewer blocks and pixels); LayerScale starts at
# 0.5, not timm's 1e-6 or 1e-5, so that each block changes the output beyond the tests' tolerances
TIMM_SMALL = {
    "vit_tiny_patch16_224": dict(img_size=32, patch_size=8, depth=4),
    "deit_small_patch16_224": dict(img_size=32, patch_size=8, depth=4),
    "deit_small_distilled_patch16_224": dict(img_size=32, patch_size=8, depth=4),
    "deit3_small_patch16_224": dict(img_size=32, patch_size=8, depth=4, init_values=0.5),
    "vit_small_patch14_reg4_dinov2": dict(img_size=56, depth=4, init_values=0.5),
}
PREFIX_TOKENS = {
    "vit_tiny_patch16_224": 1,
    "deit_small_patch16_224": 1,
    "deit_small_distilled_patch16_224": 2,
    "deit3_small_patch16_224": 1,
    "vit_small_patch14_reg4_dinov2": 5,
}


FAITHFUL_MODELS = [  # the timm ViTs each method is compared on against its reference implementation
    "deit_small_patch16_224",  # DeiT-S-shaped
    "deit3_small_patch16_224",  # LayerScale, class token added after positions
    "deit_small_distilled_patch16_224",  # two prefix tokens (class and distillation)
    "vit_small_patch14_reg4_dinov2",  # LayerScale and four register tokens
]


def timm_vit(name: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {**TIMM_SMALL.get(name, {}), **overrides}
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def with_explicit_softmax(model: nn.Module) -> nn.Module:
    """``model`` (a timm ViT) with its blocks computing ``softmax(q @ kᵀ) @ v`` instead of fused SDPA."""
    for block in model.blocks:
        block.attn.fused_attn = False
    return model


def torchvision_vit(depth: int = 4) -> nn.Module:
    """torchvision's ``VisionTransformer`` (the class behind ``vit_b_16``) at test size."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=depth, num_heads=4, hidden_dim=64, mlp_dim=128
    ).eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the head at zero: all logits 0
    return model


def hf_vit(depth: int = 4) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=depth, num_attention_heads=4,
        intermediate_size=128, num_labels=10,
    )
    return ViTForImageClassification(config).eval()


def hf_clip() -> nn.Module:
    """Hugging Face's ``CLIPModel`` at test size: a text tower (``input_ids``) and a vision tower (``pixel_values``,
    32² images)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(0)
    text = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).eval()


class TokenMixer(nn.Module):
    """Multi-head self-attention written out: ``softmax(q @ kᵀ / √d) @ v``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def split(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k and v of ``tokens`` ``[B, N, C]``, each ``[B, H, N, C / H]``."""
        b, n, c = tokens.shape
        return tuple(t.view(b, n, self.heads, c // self.heads).transpose(1, 2)
                     for t in self.to_qkv(tokens).chunk(3, dim=-1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        q, k, v = self.split(tokens)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // self.heads), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, n, c))


class Stage(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.pre_mix = nn.LayerNorm(width)
        self.mix = TokenMixer(width, heads)
        self.pre_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.mix(self.pre_mix(tokens))
        return tokens + self.ffn(self.pre_ffn(tokens))


class HandWrittenViT(nn.Module):
    """A ViT with explicit attention and none of timm's module names."""

    image_size = 32

    def __init__(self, width: int = 48, heads: int = 3, depth: int = 4, patch: int = 8, registers: int = 0):
        super().__init__()
        grid = (self.image_size // patch) ** 2
        self.to_patches = nn.Conv2d(3, width, patch, stride=patch)
        self.class_embedding = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.memory = nn.Parameter(torch.randn(1, registers, width) * 0.02)
        self.positions = nn.Parameter(torch.randn(1, grid + 1 + registers, width) * 0.02)
        self.stages = nn.ModuleList(Stage(width, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, 7)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.to_patches(images).flatten(2).transpose(1, 2)
        summary = self.class_embedding.expand(patches.shape[0], -1, -1)
        memory = self.memory.expand(patches.shape[0], -1, -1)
        return torch.cat([summary, memory, patches], dim=1) + self.positions

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(images)
        for stage in self.stages:
            tokens = stage(tokens)
        return self.classifier(self.final_norm(tokens)[:, 0])


def lookout(reads: str = "summary") -> nn.Module:
    """The zoo's hand-written ViT whose names share nothing with timm's (:class:`fxprune.tools.zoo.Glance`)."""
    from fxprune.tools.zoo import Glance

    torch.manual_seed(0)
    return Glance(reads, depth=4).eval()


def hand_written_vit(**kwargs) -> HandWrittenViT:
    torch.manual_seed(0)
    return HandWrittenViT(**kwargs).eval()


class BiasedMixer(TokenMixer):
    """Attention with a learned bias per (query, key) position, like a relative position bias."""

    def __init__(self, width: int, heads: int, tokens: int):
        super().__init__(width, heads)
        self.bias = nn.Parameter(torch.zeros(heads, tokens, tokens))

    def forward(self, tokens):
        b, n, c = tokens.shape
        q, k, v = self.split(tokens)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // self.heads) + self.bias, dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, n, c))


class RotatedMixer(TokenMixer):
    """Attention whose patch queries and keys are scaled by a learned table ``[patches, head size]``, like rotary
    tables; with 16 patches and 16-channel heads its token axis cannot be told from its channel axis."""

    def __init__(self, width: int, heads: int, patches: int):
        super().__init__(width, heads)
        self.table = nn.Parameter(torch.ones(patches, width // heads))

    def forward(self, tokens):
        b, n, c = tokens.shape
        q, k, v = self.split(tokens)
        q = torch.cat([q[:, :, :1], q[:, :, 1:] * self.table], dim=2)
        k = torch.cat([k[:, :, :1], k[:, :, 1:] * self.table], dim=2)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // self.heads), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, n, c))


def with_unclear_position_table_in_block_3():
    model = hand_written_vit()
    model.stages[3].mix = RotatedMixer(48, 3, 16)
    return model


def with_position_bias_in_block_3():
    model = hand_written_vit()
    model.stages[3].mix = BiasedMixer(48, 3, 17)
    return model


def image_batch(model: nn.Module, batch: int = 3, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from fxprune.capture import default_example_inputs

    size = default_example_inputs(model)[0].shape[1:]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *size, generator=generator).to(dtype)


def logits(output) -> torch.Tensor:
    """The class scores of any of these models' outputs (HF returns a ModelOutput)."""
    return output if isinstance(output, torch.Tensor) else output.logits


def assert_same_outputs(rewritten: nn.Module, model: nn.Module, atol: float = 1e-5, what: str = "") -> None:
    """``rewritten`` gives ``model``'s class scores, to ``atol``, on a batch of three images (a failure names
    ``what``)."""
    x = image_batch(model, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(logits(rewritten(x)), logits(model(x)), atol=atol, rtol=0,
                                   msg=lambda message: f"{what}: {message}" if what else message)


def assert_compiles_once(gm: nn.Module, model: nn.Module) -> None:
    """``fxprune.lower(gm)`` gives ``gm``'s outputs (to 1e-5) for batches 4, 4, 6 and 3 from one graph: no graph
    break and no recompile."""
    from torch._dynamo.testing import CompileCounter

    import fxprune

    torch._dynamo.reset()
    counter = CompileCounter()
    lowered = fxprune.lower(gm, backend=counter)
    for batch in (4, 4, 6, 3):
        x = image_batch(model, batch=batch)
        with torch.no_grad():
            torch.testing.assert_close(lowered(x), gm(x), atol=1e-5, rtol=0)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def assert_each_image_gets_what_it_gets_alone(gm: nn.Module, x: torch.Tensor, atol: float = 1e-4) -> None:
    """``gm`` on the batch ``x`` gives each image what it gives that image alone, eager and compiled (the
    static layout; dynamo's graph run by its eager backend)."""
    import fxprune

    lowered = fxprune.lower(gm, backend="eager")
    with torch.no_grad():
        alone = torch.cat([logits(gm(x[i : i + 1])) for i in range(len(x))])
        torch.testing.assert_close(logits(gm(x)), alone, atol=atol, rtol=0)
        torch.testing.assert_close(logits(lowered(x)), alone, atol=atol, rtol=0)
    torch._dynamo.reset()


def digits_vit(depth: int | None = None) -> nn.Module:
    """fxprune's trained digits ViT: peaked class attention, so ATS keeps different counts for different images.
    ``depth``: only its first blocks (a smaller graph to compile; the head reads what the last one gives)."""
    from fxprune.tools.models import digits_vit

    model = digits_vit()
    if depth is not None:
        model.blocks = model.blocks[:depth]
    return model


def digit_scenes(count: int) -> torch.Tensor:
    """``count`` held-out digit scenes for :func:`digits_vit`."""
    from fxprune.tools.datasets import DigitScenes

    data = DigitScenes("test", count, seed=1)
    return torch.stack([data[i][0] for i in range(count)])


ALL_MODELS = {
    **{name: (lambda name=name: timm_vit(name)) for name in TIMM_SMALL},
    "torchvision_vit": torchvision_vit,
    "hf_vit": hf_vit,
    "hand_written": hand_written_vit,
}


def rows_counting_video() -> torch.nn.Module:
    """Hugging Face's V-JEPA 2 classifier at test size (2 × 6 × 6 = 72 tubelets, no prefix token, an attention
    pool): each block numbers its rotary positions ``arange(x.size(1))`` of the rows its attention is given."""
    from transformers import VJEPA2Config, VJEPA2ForVideoClassification

    torch.manual_seed(0)
    model = VJEPA2ForVideoClassification(VJEPA2Config(
        crop_size=48, frames_per_clip=4, tubelet_size=2, patch_size=8, hidden_size=48, num_hidden_layers=3,
        num_attention_heads=3, mlp_ratio=2.0, num_labels=10, num_pooler_layers=1))
    torch.nn.init.normal_(model.classifier.weight)  # outputs far apart from clip to clip
    return model.eval().double()


def saved_and_loaded(module: nn.Module) -> nn.Module:
    """``module`` saved with ``torch.save`` and loaded back."""
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


class ZerosBiasAttention(nn.Module):
    """Attention with an additive bias made by ``torch.zeros`` from sizes read from its input, one by one."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.heads, self.qkv, self.proj = attention.num_heads, attention.qkv, attention.proj

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        bias = torch.zeros(B, 1, N, N, dtype=x.dtype, device=x.device)
        o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


def zeros_bias_vit() -> nn.Module:
    """A tiny timm ViT whose attentions add a zero bias ``[B, 1, N, N]`` made from their input's sizes: a position
    term with a table per image."""
    model = timm_vit("vit_tiny_patch16_224")
    for block in model.blocks:
        block.attn = ZerosBiasAttention(block.attn)
    return model
