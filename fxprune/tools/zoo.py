"""The zoo: what fxprune does to architectures it was not written for.

Tiny random-weight models (32–64 px, two to four blocks, a few channels) of 30+ timm architectures, torchvision's
and Hugging Face's ViT and hand-written ViTs whose names share nothing with timm's, each tried with every
registered method as a new user would: ``fxprune.transform(model, method.example((1, 2)))`` (its shapes checked at
the captured batch size, then run for real on two more: :func:`try_method`). Each try ends one way:

* **rewritten**: the rewrite reduces MACs (an adaptive method: per image), each image of a batch gets what it
  gets alone (≤ 1e-4), and the method's identity setting (keep rate 1, r = 0) reproduces the model (≤ 1e-5;
  a model with a dense output, every token, gets the original token layout back, which the plan says);
* **refused**: an :class:`~fxprune.FxPruneError` that names the block and the reason.

Anything else (another exception, a rewrite that fails its checks) is a bug, which the zoo test catches.
``fxprune zoo`` prints the table (model × method) that the README shows; ``fxprune zoo --write README.md`` puts it
between the README's zoo markers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from ..capture import reusing_captures
from ..errors import FxPruneError
from ..methods import Method, methods
from ..policies import Policy

__all__ = [
    "Entry", "Glance", "Stack", "SequenceFirst", "Towers", "TINY_VIT", "Outcome", "ZOO", "try_method", "try_entry",
    "try_all", "short_reason", "table", "with_table", "MARKERS",
]

LAYERS = (1, 2)  # where each method's example setting reduces: two blocks in a row, after a dense one


@dataclasses.dataclass(frozen=True)
class Entry:
    """A zoo model: its ``name``, where it comes from (``source``) and how to build it (tiny, random weights)."""

    name: str
    source: str
    build: Callable[[], nn.Module]

    def model(self) -> nn.Module:
        """The model, with random weights (std 0.02, seeded) in each linear layer whose weights all start below
        1e-3 (the classifiers of torchvision's ViT, at zero, and of timm's EVA and BEiT, scaled down) and ones in
        each layer scale that starts tiny (a vector of one value below 1e-3, as DeiT III's and CaiT's): as built,
        such a model gives every image nearly the same output, against which every check would pass."""
        model = self.build()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, nn.Linear) and layer.weight.abs().amax() < 1e-3:
                    layer.weight.copy_(0.02 * torch.randn(layer.weight.shape, generator=generator))
            for parameter in model.parameters():
                if parameter.dim() == 1 and 0 < parameter[0].abs() < 1e-3 and (parameter == parameter[0]).all():
                    parameter.fill_(1.0)
        return model


def _timm(name: str, label: str = "", **overrides) -> Entry:
    """timm's ``name`` with ``overrides``, listed as ``name`` and ``label``."""

    def build() -> nn.Module:
        import timm

        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, **overrides).eval()

    return Entry(f"{name} {label}".strip(), "timm", build)


TINY_VIT = dict(img_size=40, patch_size=8, depth=3, embed_dim=64, num_heads=2)  # 25 patches: no size is another's
_SMALL = dict(img_size=64)


def _torchvision() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(32, 8, 3, 3, 48, 96, num_classes=10).eval()


_HF_TINY = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                intermediate_size=96)


def _hugging_face(model: str = "ViT", task: str = "ForImageClassification", **options: Any) -> Callable[[], nn.Module]:
    """A builder of the tiny random-weight Hugging Face ``<model><task>`` with ``options`` on its config (SigLIP's:
    on its vision config)."""

    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        config = getattr(transformers, f"{model}Config")
        config = config(vision_config={**_HF_TINY, **options}, num_labels=10) if model == "Siglip" else config(
            **{**_HF_TINY, **options}, num_labels=10)
        return getattr(transformers, f"{model}{task}")(config).eval()

    return build


def _depth_anything() -> nn.Module:
    """The tiny random-weight Hugging Face Depth Anything: a DINOv2 backbone whose four blocks' tokens a DPT neck
    reads, its head giving metric depth (up to 20). The neck and head take PyTorch's default initialisation: with
    Hugging Face's (std 0.02) every image's depth is within 1e-6 of zero."""
    import transformers

    torch.manual_seed(0)
    backbone = transformers.Dinov2Config(**{**_HF_TINY, "num_hidden_layers": 4}, out_indices=[1, 2, 3, 4],
                                         reshape_hidden_states=False)
    model = transformers.DepthAnythingForDepthEstimation(transformers.DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=48, patch_size=8, fusion_hidden_size=16, head_hidden_size=8,
        neck_hidden_sizes=[8, 16, 24, 32], depth_estimation_type="metric", max_depth=20)).eval()
    for part in (model.neck, model.head):
        for layer in part.modules():
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                layer.reset_parameters()
    return model


class Glance(nn.Module):
    """A hand-written ViT with none of timm's names: a learned ``summary`` token, positions ``where``, fused
    attention; its output reads ``reads``: ``'summary'`` (``final(x)[:, 0]``), ``'mean'`` (every token averaged)
    or ``'all'`` (every token: a dense output). ``parallel``: each block adds its attention and its MLP, both of
    its input (``x + attention(x) + mlp(x)``, ViT-22B's parallel block), instead of one after the other."""

    image_size = 32

    def __init__(self, reads: str, parallel: bool = False, width: int = 48, heads: int = 3, depth: int = 3,
                 patch: int = 8):
        super().__init__()
        self.reads, self.parallel, self.heads = reads, parallel, heads
        self.cut = nn.Conv2d(3, width, patch, stride=patch)
        self.summary = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.where = nn.Parameter(torch.randn(1, (self.image_size // patch) ** 2 + 1, width) * 0.02)
        self.looks = nn.ModuleList(nn.ModuleDict({
            "a": nn.LayerNorm(width), "qkv": nn.Linear(width, 3 * width), "o": nn.Linear(width, width),
            "b": nn.LayerNorm(width), "f": nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width)),
        }) for _ in range(depth))
        self.final = nn.LayerNorm(width)
        self.decide = nn.Linear(width, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.cut(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.summary.expand(x.shape[0], -1, -1), x], dim=1) + self.where
        for look in self.looks:
            b, n, c = x.shape
            q, k, v = look["qkv"](look["a"](x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            attended = look["o"](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
            if self.parallel:
                x = x + attended + look["f"](look["b"](x))
            else:
                x = x + attended
                x = x + look["f"](look["b"](x))
        x = self.final(x)
        if self.reads == "summary":
            return self.decide(x[:, 0])
        return self.decide(x.mean(1)) if self.reads == "mean" else x


class Stack(nn.Module):
    """A hand-written ViT on ``torch.nn.TransformerEncoder`` (``norm_first``: pre-norm layers, else post-norm as
    PyTorch's default; ``batch_first``: tokens ``[B, N, C]``, else ``[N, B, C]`` as PyTorch's default), its output
    reading the class token."""

    image_size = 32

    def __init__(self, norm_first: bool, batch_first: bool = True, width: int = 48, heads: int = 3, depth: int = 3,
                 patch: int = 8):
        super().__init__()
        self.batch_first = batch_first
        self.patches = nn.Conv2d(3, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.positions = nn.Parameter(torch.randn(1, (self.image_size // patch) ** 2 + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patches(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.positions
        if self.batch_first:
            return self.head(self.encoder(x)[:, 0])
        return self.head(self.encoder(x.transpose(0, 1))[0])


class _ResidualAttention(nn.Module):
    """A pre-norm block on ``[N, B, C]`` tokens with ``nn.MultiheadAttention``, as OpenAI's CLIP writes it."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn, self.ln_1, self.ln_2 = nn.MultiheadAttention(width, heads), nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class SequenceFirst(nn.Module):
    """A hand-written ViT in OpenAI CLIP's visual layout: its blocks run on ``[N, B, C]`` tokens (``permute(1, 0,
    2)`` before and after them), its output reads the class token."""

    image_size = 32

    def __init__(self, width: int = 48, heads: int = 3, depth: int = 3, patch: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.02)
        self.positional_embedding = nn.Parameter(torch.randn((self.image_size // patch) ** 2 + 1, width) * 0.02)
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.resblocks = nn.Sequential(*(_ResidualAttention(width, heads) for _ in range(depth)))
        self.proj = nn.Linear(width, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding)
        x = self.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.proj(self.ln_post(x[:, 0, :]))


class Towers(nn.Module):
    """Several token streams: two hand-written ViTs (:class:`Glance`) whose logits are summed (``views=False``: an
    ensemble), or one called on the images and on their mirror images (``views=True``: test-time augmentation)."""

    image_size = Glance.image_size

    def __init__(self, views: bool):
        super().__init__()
        self.views, self.a = views, Glance("summary")
        if not views:
            self.b = Glance("summary")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.a(images) + (self.a(images.flip(-1)) if self.views else self.b(images))


def _einops_vit() -> nn.Module:
    """A hand-written ViT in the style of einops users (``vit-pytorch``): patches cut by an einops ``Rearrange``
    layer, heads split and joined by ``einops.rearrange``, the class token copied by ``einops.repeat``, attention
    an ``nn.Softmax`` over ``q @ kᵀ``, residuals added after each branch."""
    import einops
    from einops.layers.torch import Rearrange

    class Attend(nn.Module):
        def __init__(self, width: int, heads: int):
            super().__init__()
            self.heads, self.scale = heads, (width // heads) ** -0.5
            self.norm, self.softmax = nn.LayerNorm(width), nn.Softmax(dim=-1)
            self.qkv, self.out = nn.Linear(width, 3 * width, bias=False), nn.Linear(width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = (einops.rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                       for t in self.qkv(self.norm(x)).chunk(3, dim=-1))
            weights = self.softmax(q @ k.transpose(-1, -2) * self.scale)
            return self.out(einops.rearrange(weights @ v, "b h n d -> b n (h d)"))

    class EinopsViT(nn.Module):
        image_size = 32

        def __init__(self, width: int = 48, heads: int = 3, depth: int = 3, patch: int = 8):
            super().__init__()
            self.embed = nn.Sequential(Rearrange("b c (h p) (w q) -> b (h w) (p q c)", p=patch, q=patch),
                                       nn.Linear(3 * patch * patch, width))
            self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
            self.positions = nn.Parameter(torch.randn(1, (self.image_size // patch) ** 2 + 1, width) * 0.02)
            self.layers = nn.ModuleList(nn.ModuleList([Attend(width, heads), nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))])
                for _ in range(depth))
            self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 5))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = self.embed(images)
            x = torch.cat([einops.repeat(self.cls, "1 1 c -> b 1 c", b=x.shape[0]), x], dim=1) + self.positions
            for attend, mlp in self.layers:
                x = attend(x) + x
                x = mlp(x) + x
            return self.head(x[:, 0])

    return _seeded(EinopsViT)()


def _seeded(cls: type[nn.Module], *args: Any) -> Callable[[], nn.Module]:
    """A builder of ``cls(*args)`` in evaluation mode, its weights drawn after seeding with 0."""

    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls(*args).eval()

    return build


ZOO: tuple[Entry, ...] = (
    # plain ViTs and their variants
    _timm("vit_tiny_patch16_224", **TINY_VIT),
    _timm("deit_tiny_distilled_patch16_224", **TINY_VIT),
    _timm("deit3_small_patch16_224", **TINY_VIT),
    _timm("vit_small_patch14_reg4_dinov2", **TINY_VIT),
    _timm("vit_base_patch16_siglip_224", **TINY_VIT),
    _timm("vit_so150m_patch16_reg4_map_256", **TINY_VIT),  # an attention pool over the rows after 4 registers
    _timm("vit_base_patch16_rpn_224", **TINY_VIT),
    _timm("vit_small_patch16_18x2_224", **{**TINY_VIT, "depth": 2}),
    # position-dependent attention: relative position bias, rotary embeddings
    _timm("beit_base_patch16_224", **TINY_VIT),
    _timm("vit_relpos_small_patch16_224", **TINY_VIT),
    _timm("eva02_tiny_patch14_224", **TINY_VIT),
    _timm("vit_small_patch16_rope_224", **TINY_VIT),
    _timm("vit_small_patch16_dinov3", **TINY_VIT),
    _timm("vit_tiny_patch16_224", "features_only (every block's feature map)", **TINY_VIT, features_only=True,
          out_indices=(0, 1, 2)),
    _timm("vit_base_patch16_xp_224", **TINY_VIT),
    # other attention or token layouts
    _timm("cait_xxs24_224", **TINY_VIT, depth_token_only=1),
    _timm("xcit_nano_12_p16_224", **TINY_VIT),
    _timm("convit_tiny", **{**TINY_VIT, "depth": 4}, local_up_to_layer=1),
    _timm("crossvit_9_240", depth=((1, 2, 0),)),
    _timm("vitamin_small_224", **_SMALL, depth=3),
    _timm("volo_d1_224"),
    # hierarchical: windows or pooling between stages
    _timm("swin_tiny_patch4_window7_224", img_size=56, embed_dim=24, depths=(1, 1), num_heads=(2, 4)),
    _timm("pit_ti_224", **_SMALL),
    _timm("levit_128s"),
    _timm("mvitv2_tiny"),
    _timm("twins_svt_small", **_SMALL),
    _timm("hiera_tiny_224"),
    _timm("samvit_base_patch16", img_size=64, patch_size=16, depth=2, embed_dim=48, num_heads=3, window_size=2,
          global_attn_indexes=(1,)),
    _timm("nest_tiny", img_size=32),
    _timm("efficientvit_m0", **_SMALL),
    _timm("pvt_v2_b0"),
    _timm("mobilevit_xxs", **_SMALL),
    # not timm
    Entry("torchvision vit (MultiheadAttention)", "torchvision", _torchvision),
    Entry("Hugging Face ViTForImageClassification", "hf", _hugging_face()),
    Entry("Hugging Face BeitForImageClassification (relative position bias)", "hf",
          _hugging_face("Beit", use_relative_position_bias=True)),
    Entry("Hugging Face Dinov2WithRegistersForImageClassification", "hf",
          _hugging_face("Dinov2WithRegisters", num_register_tokens=4)),
    Entry("Hugging Face SiglipForImageClassification", "hf", _hugging_face("Siglip")),
    Entry("Hugging Face DINOv3ViTModel (rotary, registers)", "hf",
          _hugging_face("DINOv3ViT", "Model", num_attention_heads=2, num_register_tokens=4)),
    Entry("Hugging Face Aimv2VisionModel (every token beside an attention pool)", "hf",
          _hugging_face("Aimv2Vision", "Model", num_attention_heads=2)),
    Entry("Hugging Face VivitForVideoClassification (video: clips of tubelets)", "hf",
          _hugging_face("Vivit", "ForVideoClassification", num_frames=4, tubelet_size=[2, 8, 8])),
    Entry("Hugging Face YolosForObjectDetection (detection tokens after the patches)", "hf",
          _hugging_face("Yolos", "ForObjectDetection", image_size=[32, 32], num_detection_tokens=5)),
    Entry("Hugging Face DepthAnythingForDepthEstimation (a neck reads four blocks' tokens)", "hf", _depth_anything),
    Entry("hand-written: summary token read alone", "hand-written", _seeded(Glance, "summary")),
    Entry("hand-written: mean over every token", "hand-written", _seeded(Glance, "mean")),
    Entry("hand-written: dense output", "hand-written", _seeded(Glance, "all")),
    Entry("hand-written: parallel blocks (x + attention(x) + mlp(x))", "hand-written",
          _seeded(Glance, "summary", True)),
    Entry("hand-written: two ViTs summed (an ensemble)", "hand-written", _seeded(Towers, False)),
    Entry("hand-written: one ViT on the images and on their mirror images", "hand-written", _seeded(Towers, True)),
    Entry("hand-written on nn.TransformerEncoder (pre-norm)", "hand-written", _seeded(Stack, True)),
    Entry("hand-written on nn.TransformerEncoder (post-norm)", "hand-written", _seeded(Stack, False)),
    Entry("hand-written on nn.TransformerEncoder (pre-norm, [N, B, C] tokens: PyTorch's default)", "hand-written",
          _seeded(Stack, True, False)),
    Entry("hand-written in OpenAI CLIP's layout ([N, B, C] tokens in its blocks)", "hand-written",
          _seeded(SequenceFirst)),
    Entry("hand-written with einops (vit-pytorch style)", "hand-written", _einops_vit),
)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one method fared on one model: rewritten (with its checks) or refused (with the reason)."""

    model: str
    method: str
    refusal: str | None = None
    macs_ratio: float | None = None
    batch_error: float | None = None
    identity_error: float | None = None
    dense_output: bool = False
    spread: float | None = None  # how far apart the model's own outputs for the batch's images are

    @property
    def rewritten(self) -> bool:
        return self.refusal is None

    @property
    def sound(self) -> bool:
        """Refused with a reason, or rewritten with fewer MACs (or an adaptive method's), each image of a batch
        given what it gets alone and the identity setting reproducing the model, on a model whose outputs for the
        batch's images are more than 1e-2 apart (else those checks could not fail)."""
        if not self.rewritten:
            return bool(self.refusal)
        fewer = self.macs_ratio is None or self.macs_ratio > 1.0
        alone = self.batch_error is not None and self.batch_error <= 1e-4
        identity = self.identity_error is None or self.identity_error <= 1e-5
        telling = self.spread is not None and self.spread > 1e-2
        return fewer and alone and identity and telling


def _tensor(output: object) -> torch.Tensor:
    """The first tensor of a model's output (a Hugging Face ``ModelOutput``'s logits)."""
    return next(t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)) if not isinstance(
        output, torch.Tensor) else output


def _images(model: nn.Module) -> torch.Tensor:
    from ..capture import default_example_inputs

    size = default_example_inputs(model)[0].shape[1:]
    return torch.randn(3, *size, generator=torch.Generator().manual_seed(1))


def _largest_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.shape == b.shape else math.inf


def _checked_once(model: nn.Module, policy: Policy) -> nn.Module:
    """``transform(model, policy)`` with its shapes checked at the captured batch size only (:func:`try_method` runs
    it on two more batch sizes for real)."""
    from ..pipeline import rewrite

    return rewrite(model, policy, None, copy_weights=False, second_batch=False)[0]


def _measured(model: nn.Module, name: str, method: Method, gm: nn.Module, identity: nn.Module | None) -> Outcome:
    """The outcome of the rewrite ``gm`` (and of the identity setting's, ``identity``) on the zoo's three images."""
    x = _images(model)
    with torch.no_grad():
        together, original = _tensor(gm(x)), _tensor(model(x))
        batch_error = max(_largest_gap(together[i:i + 1], _tensor(gm(x[i:i + 1]))) for i in range(x.shape[0]))
        identity_error = None if identity is None else _largest_gap(_tensor(identity(x)), original)
    spread = max(_largest_gap(original[i:i + 1], original[:1]) for i in range(1, x.shape[0]))
    plan = gm.fxprune_plan
    dense = any("the original token layout" in note for note in plan.notes)
    ratio = None if method.adaptive else plan.macs_before / plan.macs_after
    return Outcome(name, method.name, None, ratio, batch_error, identity_error, dense, spread)


def try_method(model: nn.Module, name: str, method: Method, layers: Sequence[int] = LAYERS) -> Outcome:
    """``method``'s example setting at ``layers`` on ``model`` (called ``name``): see the module docstring. Each
    rewrite is checked at the captured batch size, then run on three images and on each alone; where that fails
    (an error, or failed checks), ``transform``'s check at a second batch size decides: its refusal (a size taken
    from the captured batch) is the outcome, else the failure stands."""
    from ..pipeline import transform

    policies = [method.example(tuple(layers)), *([] if method.identity is None else [method.identity(tuple(layers))])]
    outcome, failure = None, None
    try:
        gm, *identity = [_checked_once(model, policy) for policy in policies]
        try:
            outcome = _measured(model, name, method, gm, identity[0] if identity else None)
        except Exception as error:
            failure = error
        if outcome is None or not outcome.sound:
            for policy in policies:
                transform(model, policy)  # refuses a size taken from the captured batch, saying where
    except FxPruneError as error:
        return Outcome(name, method.name, refusal=str(error))
    if failure is not None:
        raise failure
    return outcome


def try_entry(entry: Entry, names: Sequence[str] | None = None) -> list[Outcome]:
    """Every registered method (those named in ``names``) on ``entry``'s model, each at the blocks of
    :data:`LAYERS` that the model has (block 0 when it has one). The model is captured once for every method
    (:func:`~fxprune.capture.reusing_captures`) and analysed once: a method its plan refuses gets the error that
    ``transform`` would raise there, which starts with the same analysis and plan."""
    from ..analysis import analyse
    from ..planning import make_plan

    model = entry.model()
    chosen = [method for method in methods() if names is None or method.name in names]
    with reusing_captures():
        try:
            program = analyse(model)
        except FxPruneError as error:
            return [Outcome(entry.name, method.name, refusal=str(error)) for method in chosen]
        layers = tuple(layer for layer in LAYERS if layer < len(program.blocks)) or (0,)
        outcomes = []
        for method in chosen:
            try:
                make_plan(program, method.example(layers))
            except FxPruneError as error:
                outcomes.append(Outcome(entry.name, method.name, refusal=str(error)))
                continue
            outcomes.append(try_method(model, entry.name, method, layers))
    return outcomes


def _try_named(name: str) -> list[Outcome]:
    torch.set_num_threads(1)  # tiny models: one thread each, one process per core
    return try_entry(next(entry for entry in ZOO if entry.name == name))


def try_all(entries: Sequence[Entry], processes: int = 1) -> list[list[Outcome]]:
    """:func:`try_entry` on each of ``entries`` (zoo entries), in ``processes`` worker processes (tiny models keep
    one core busy each)."""
    if processes <= 1:
        return [try_entry(entry) for entry in entries]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return pool.map(_try_named, [entry.name for entry in entries], chunksize=1)


_SHORT = (  # the reasons of common refusals, said in a few words (the full reason is in the error)
    (r"token axes cannot be told", "position tables of unclear axes"),
    (r"windowed attention", "windowed attention"),
    (r"not a \[B, N, C\] token sequence", "not a token sequence (hierarchical)"),
    (r"attention call\(s\) it cannot read", "attention not over [B, H, N, d]"),
    (r"Modules or functions called whole may hide it", "attention inside modules kept whole"),
    (r"found no attention", "no attention found"),
    (r"has no class token", "no class token"),
    (r"keys pooled from the tokens", "queries ≠ keys (pooled keys, class attention)"),
    (r"map is not over the stream's tokens", "attention map not over the tokens"),
    (r"pools over all tokens", "pool cannot skip padding"),
    (r"needs every token", "a later block needs every token"),
    (r"no residual addition", "no residual add after attention"),
    (r"parallel attentions", "two attentions side by side in a block"),
    (r"differential attention", "two attention maps combined (differential attention)"),
    (r"a parallel block", "attention and MLP side by side (parallel block)"),
    (r"talking-heads attention", "heads mixed (talking heads)"),
    (r"tells every later attention", "a later attention over other keys"),
    (r"assumes the original token count", "a later layer needs the original token count"),
    (r"keys of block .* were not found", "attention keys not found"),
    (r"between q @ kᵀ and the softmax", "a bias added to the attention logits"),
    (r"tokens after the patches", "tokens after the patches (detection tokens)"),
    (r"stream leaves the tokens", "the token stream leaves the tokens"),
    (r"residual addition .* is not on the token stream", "a sum of several blocks' tokens"),
    (r"not a pre-norm block", "not a pre-norm block"),
    (r"token streams", "several token streams (towers, views)"),
)


def short_reason(refusal: str) -> str:
    """A few words for a refusal's reason, for the table."""
    return next((short for pattern, short in _SHORT if re.search(pattern, refusal)), refusal[:60])


def table(outcomes: Sequence[Outcome]) -> str:
    """A markdown table, one row per model and one column per method: ✓ (rewritten, checked) or the refusal."""
    models = list(dict.fromkeys(o.model for o in outcomes))
    names = list(dict.fromkeys(o.method for o in outcomes))
    cell = {(o.model, o.method): o for o in outcomes}
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for model in models:
        marks = []
        for name in names:
            outcome = cell[model, name]
            if not outcome.sound:
                marks.append("✗ failed its checks")
            elif outcome.rewritten:
                marks.append("✓ layout restored" if outcome.dense_output else "✓")
            else:
                marks.append(f"refused: {short_reason(outcome.refusal)}")
        lines.append(f"| {model} | " + " | ".join(marks) + " |")
    return "\n".join(lines)


MARKERS = ("<!-- fxprune zoo: generated by `fxprune zoo --write README.md` -->", "<!-- end of fxprune zoo -->")


def with_table(document: str, text: str) -> str:
    """``document`` with ``text`` between its :data:`MARKERS` (each on a line of its own)."""
    start, end = document.index(MARKERS[0]), document.index(MARKERS[1])
    return document[:start + len(MARKERS[0])] + "\n" + text + "\n" + document[end:]
