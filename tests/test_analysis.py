import pytest
import timm
import torch
import torchvision
from torch import nn
from vits import (
    ALL_MODELS,
    PREFIX_TOKENS,
    TIMM_SMALL,
    assert_each_image_gets_what_it_gets_alone,
    assert_same_outputs,
    hand_written_vit,
    hf_vit,
    image_batch,
    timm_vit,
    torchvision_vit,
    with_explicit_softmax,
    with_position_bias_in_block_3,
    with_unclear_position_table_in_block_3,
)

import fxprune
from fxprune import EViT
from fxprune.analysis import ancestors
from fxprune.errors import UnsupportedModelError


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_every_attention_block_is_found_and_reducible(name):
    program = fxprune.analyse(ALL_MODELS[name]())
    assert len(program.blocks) == 4
    assert all(b.reducible for b in program.blocks)
    assert program.class_token
    assert all(b.tokens == program.tokens for b in program.blocks)
    assert all(b.attention.queries == b.attention.keys == program.tokens for b in program.blocks)


@pytest.mark.parametrize("name", sorted(TIMM_SMALL))
def test_prefix_tokens_of_timm_models(name):
    assert fxprune.analyse(timm_vit(name)).prefix_tokens == PREFIX_TOKENS[name]


@pytest.mark.parametrize("factory", [torchvision_vit, hf_vit, hand_written_vit])
def test_prefix_token_is_inferred_from_the_sequence_without_timm_attributes(factory):
    program = fxprune.analyse(factory())
    assert (program.prefix_tokens, program.class_token) == (1, True)


def test_register_tokens_count_as_prefix_in_a_hand_written_model():
    program = fxprune.analyse(hand_written_vit(registers=3))
    assert (program.prefix_tokens, program.class_token, program.tokens) == (4, True, 20)


def test_registers_placed_after_the_class_token_count_as_prefix_and_keep_their_place():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersForImageClassification

    torch.manual_seed(0)  # cat([x[:, :1], registers, x[:, 1:]]) of a sequence that already holds the class token
    model = Dinov2WithRegistersForImageClassification(Dinov2WithRegistersConfig(
        image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96,
        num_register_tokens=4, num_labels=10)).eval()
    assert fxprune.analyse(model).prefix_tokens == 5
    assert_same_outputs(fxprune.transform(model, fxprune.DynamicViT(1.0, (1, 2))), model)  # keep 1 sorts its rows


def test_registers_joined_inside_an_embedding_module_called_whole_count_as_prefix():
    model = timm_vit("naflexvit_base_patch16_gap", img_size=40, patch_size=8, depth=2, embed_dim=64, num_heads=2)
    images = (torch.randn(2, 3, 40, 40),)  # timm registers its embeddings (with the cat) as a module not to trace
    assert fxprune.analyse(model, images).prefix_tokens == 4  # before: 0, the registers taken for patches
    rewritten = fxprune.transform(model, fxprune.DynamicViT(1.0, (1,)), example_inputs=images)
    x = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), model(x), atol=1e-5, rtol=0)  # keep 1 sorts its rows


def test_reading_the_inputs_device_and_dtype_leaves_the_token_stream_as_it_is():
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)  # its rotary tables are made on pixel_values.device in pixel_values.dtype
    model = DINOv3ViTModel(DINOv3ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=3,
                                           num_attention_heads=2, intermediate_size=96, num_register_tokens=4)).eval()
    program = fxprune.analyse(model)
    assert (program.tokens, program.prefix_tokens) == (21, 5) and all(block.reducible for block in program.blocks)


def test_model_without_class_token_is_recognised():
    program = fxprune.analyse(timm_vit("vit_tiny_patch16_224", class_token=False, global_pool="avg"))
    assert (program.prefix_tokens, program.class_token) == (0, False)


@pytest.mark.parametrize(
    "factory, first_block",
    [
        (lambda: timm_vit("deit_small_patch16_224"), "blocks.0"),
        (torchvision_vit, "encoder.layers.encoder_layer_0"),
        (hf_vit, "vit.layers.0"),
        (hand_written_vit, "stages.0"),
    ],
)
def test_blocks_are_named_after_the_models_modules(factory, first_block):
    assert fxprune.analyse(factory()).blocks[0].name == first_block


def test_explicit_softmax_attention_is_a_site_with_its_heads():
    model = with_explicit_softmax(timm_vit("deit_small_patch16_224"))
    for program in (fxprune.analyse(model), fxprune.analyse(hand_written_vit())):
        sites = [b.attention for b in program.blocks]
        assert {s.kind for s in sites} == {"softmax"}
        assert all(s.k is not None and s.num_heads in (6, 3) for s in sites)


@pytest.mark.parametrize(
    "name, kwargs, axes",
    [
        ("beit_base_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4), (2, 3)),
        ("eva02_tiny_patch14_224", dict(img_size=56, depth=2), (0,)),
    ],
)
def test_position_dependent_attention_is_found_with_the_token_axes_of_its_terms(name, kwargs, axes):
    program = fxprune.analyse(timm.create_model(name, pretrained=False, **kwargs))
    for block in program.blocks:
        assert block.reducible and not block.needs_all_tokens
        assert block.position_terms and all(term.axes == axes for term in block.position_terms)


def test_a_position_table_whose_token_axis_cannot_be_told_is_refused():
    block = fxprune.analyse(with_unclear_position_table_in_block_3()).blocks[3]
    assert not block.reducible and block.needs_all_tokens
    assert "stages.3.mix.table [16, 16]" in block.refusal and "cannot be told" in block.refusal


def test_windowed_attention_is_refused():
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=24, depths=(1, 1), num_heads=(2, 4)
    )
    program = fxprune.analyse(model)
    assert len(program.blocks) == 2
    assert all(not b.reducible and "not a [B, N, C] token sequence" in b.refusal for b in program.blocks)


def test_talking_heads_attention_is_recognised_and_class_attention_is_not_reduced():
    program = fxprune.analyse(timm.create_model("cait_xxs24_224", pretrained=False, img_size=32, depth=2))
    self_attention, class_attention = program.blocks[:2], program.blocks[2:]
    assert [b.attention.kind for b in self_attention] == ["softmax", "softmax"] and not program.unrecognised
    assert all(b.reducible and b.attention.queries == b.tokens for b in self_attention)
    assert all("class attention" in b.refusal and not b.needs_all_tokens for b in class_attention)
    assert (program.prefix_tokens, program.class_token) == (0, False)  # its class token joins after block 1
    assert fxprune.analysis.mixes_heads(self_attention[0].attention).name == "blocks_0_attn_proj_l"


class _SquareSoftmax(torch.nn.Module):
    """A softmax over a square map that is not attention (nothing multiplies values by it)."""

    image_size = 32

    def __init__(self):
        super().__init__()
        self.inner = hand_written_vit()

    def forward(self, images):
        tokens = self.inner.embed(images)
        affinity = torch.softmax(tokens @ tokens.transpose(-2, -1), dim=-1)
        return self.inner.forward(images) + affinity.sum()


def test_unrecognised_softmax_over_a_square_map_is_reported():
    program = fxprune.analyse(_SquareSoftmax())
    assert len(program.unrecognised) == 1 and "softmax" in program.unrecognised[0]
    assert "not recognised as attention" in str(program)


def test_model_without_attention_raises():
    with pytest.raises(UnsupportedModelError, match="found no attention in ResNet"):
        fxprune.analyse(torchvision.models.resnet18(), (torch.randn(2, 3, 64, 64),))


class _AttentionWithinWindows(torch.nn.Module):
    """Attention within each of four windows of four tokens: an SDPA call on ``[B, windows, H, N, d]`` queries."""

    image_size = 32

    def __init__(self, width: int = 16, heads: int = 2):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, width, 8, 8)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.head = torch.nn.Linear(width, 10)
        self.heads = heads

    def forward(self, images):
        x = self.embed(images).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, 4, n // 4, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5)
        attended = torch.nn.functional.scaled_dot_product_attention(*qkv.unbind(0))
        return self.head((x + attended.permute(0, 1, 3, 2, 4).reshape(b, n, c)).mean(1))


def test_attention_the_analysis_cannot_read_is_named_where_it_finds_no_other():
    with pytest.raises(UnsupportedModelError, match=r"found no attention in _AttentionWithinWindows.* It found 1 "
                       r"attention call\(s\) it cannot read: attention scaled_dot_product_attention on queries "
                       r"\[2, 4, 2, 4, 8\] in forward \(not \[B, H, N, d\]: attention within windows"):
        fxprune.analyse(_AttentionWithinWindows())


def _zoo_model(name: str) -> torch.nn.Module:
    from fxprune.tools.zoo import ZOO

    return next(entry for entry in ZOO if entry.name == name).model()


def test_a_module_called_whole_that_holds_attention_is_named_in_the_summary_and_in_a_refusal():
    program = fxprune.analyse(_zoo_model("convit_tiny"))  # timm keeps its gated positional attention (GPSA) whole
    assert program.unrecognised == ["blocks.0.attn (GPSA), called whole: attention inside it is not seen"]
    assert "not recognised as attention (left as is): blocks.0.attn (GPSA)" in str(program)
    with pytest.raises(UnsupportedModelError, match=r"found no attention in ByobNet.* Modules or functions called "
                       r"whole may hide it: stages\.2\.1 \(MobileVitBlock\), stages\.3\.1 \(MobileVitBlock\)"):
        fxprune.analyse(_zoo_model("mobilevit_xxs"))


class _FoldedHeads(nn.Module):
    """Attention with its heads folded into the batch: ``softmax(q @ kᵀ) @ v`` over ``[B·H, N, d]``."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, 2, C // 2).permute(2, 0, 3, 1, 4).reshape(3, B * 2, N, C // 2)
        return ((qkv[0] @ qkv[1].transpose(1, 2)).softmax(-1) @ qkv[2]).reshape(B, 2, N, -1).transpose(1, 2).flatten(2)


def test_attention_in_a_function_called_whole_or_with_its_heads_folded_is_named_where_none_is_found():
    import torchvision

    torch.manual_seed(0)
    swin = torchvision.models.SwinTransformer([4, 4], 16, [1, 1], [2, 4], [2, 2]).eval()
    with pytest.raises(UnsupportedModelError, match=r"found no attention in SwinTransformer.* called whole may hide "
                       r"it: torchvision\.models\.swin_transformer\.shifted_window_attention \(a function called "
                       r"whole\)"):  # before: "found no attention", and nothing about it
        fxprune.analyse(swin, torch.randn(2, 3, 32, 32))
    with pytest.raises(UnsupportedModelError, match=r"found no attention in _FoldedHeads.* cannot read: softmax "
                       r"softmax over \[4, 5, 5\] in forward \(queries not \[B, H, N, d\]"):  # before: nothing said
        fxprune.analyse(_FoldedHeads(), torch.randn(2, 5, 16))


def test_finding_no_attention_says_why_the_first_module_kept_whole_failed_on_which_inputs_and_what_to_do():
    from transformers import VivitConfig, VivitModel

    video = VivitModel(VivitConfig(image_size=32, num_frames=4, tubelet_size=[2, 8, 8], hidden_size=48,
                                   num_hidden_layers=2, num_attention_heads=3, intermediate_size=96)).eval()
    with pytest.raises(UnsupportedModelError, match=r"found no attention in VivitModel.* Tracing embeddings failed on "
                       r"inputs \(2, 3, 32, 32\) \(TraceError: .*\): if VivitModel expects other inputs, pass "
                       "example_inputs"):
        fxprune.analyse(video, (torch.randn(2, 3, 32, 32),))  # images, where it expects clips [B, T, C, H, W]


def test_finding_no_attention_says_where_example_values_stopped_on_which_inputs_and_what_to_do():
    model = timm_vit("deit_small_patch16_224")
    with pytest.raises(UnsupportedModelError, match=r"queries of unknown shape.* Example values stop at getitem in "
                       r"patch_embed \(IndexError: .*\) on inputs \(3, 32, 32\): if VisionTransformer expects other "
                       "inputs, pass example_inputs"):
        fxprune.analyse(model, torch.randn(3, 32, 32))  # an image without its batch axis


def test_tokens_after_the_patches_that_do_not_depend_on_the_image_make_every_block_not_reducible():
    from transformers import YolosConfig, YolosForObjectDetection

    torch.manual_seed(0)
    detector = YolosForObjectDetection(YolosConfig(  # [class, 16 patches, 5 detection tokens]
        image_size=[32, 32], patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=96, num_detection_tokens=5, use_mid_position_embeddings=False)).eval()
    program = fxprune.analyse(detector)
    assert program.prefix_tokens == 1 and not any(block.reducible for block in program.blocks)
    assert "rows 17–21 of the 22 tokens entering the first block do not depend on the image" in str(program)
    with pytest.raises(UnsupportedModelError, match=r"block 1 \(vit\.encoder\.layer\.1\): rows 17–21 .* tokens "
                       "after the patches"):  # before: transformed, the detection tokens scored and dropped as patches
        fxprune.transform(detector, fxprune.EViT(keep_rate=0.5, layers=(1,)))


def test_tokens_of_intermediate_blocks_read_by_a_neck_are_read_apart_and_the_stream_runs_through_every_block():
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(0)  # the neck reads the hidden states after blocks 0–3 (its input size: the backbone's config)
    backbone = Dinov2Config(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=4, num_attention_heads=3,
                            intermediate_size=96, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    depth = DepthAnythingForDepthEstimation(DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=48, patch_size=8, fusion_hidden_size=16, head_hidden_size=8,
        neck_hidden_sizes=[8, 16, 24, 32])).eval()
    program = fxprune.analyse(depth)  # before: block 0 alone reducible, blocks 1–3 "the token stream leaves"
    assert all(block.reducible for block in program.blocks)
    assert all(block.mid in program.stream for block in program.blocks)
    assert [program.blocks[i + 1].input for i in range(3)] == [value for value, _ in program.reads_apart]
    assert {reader.target for _, reader in program.reads_apart} == {"backbone.layernorm"}
    assert "read apart from the stream: 3 value(s) of intermediate blocks, by backbone.layernorm" in str(program)
    assert program.readout.patches == "ordered"  # its neck convolves the last block's tokens as a grid


class _SummedStages(nn.Module):
    """The hand-written ViT whose output reads the sum of every stage's tokens (or, ``residual=False``, whose stages
    add no residual)."""

    image_size = 32

    def __init__(self, residual: bool = True):
        super().__init__()
        self.vit, self.residual = hand_written_vit(), residual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens, total = self.vit.embed(images), 0
        for stage in self.vit.stages:
            tokens = stage(tokens) if self.residual else stage.ffn(stage.mix(stage.pre_mix(tokens)))
            total = total + tokens
        return self.vit.classifier(total[:, 0])


def test_a_sum_of_several_blocks_tokens_is_refused_as_such_and_a_block_without_residual_as_that():
    summed = fxprune.analyse(_SummedStages())
    assert [block.reducible for block in summed.blocks] == [True, False, False, False]
    assert all("a sum of several blocks' outputs" in block.refusal for block in summed.blocks[1:])
    with pytest.raises(UnsupportedModelError, match="its residual addition add_.* is not on the token stream"):
        fxprune.transform(_SummedStages(), EViT(0.5, (2,)))
    refusals = {block.refusal for block in fxprune.analyse(_SummedStages(residual=False)).blocks[1:]}
    assert refusals == {"no residual addition of the block input after attention"}


def test_a_vit_on_torch_transformer_encoder_layers_is_traced_through_to_their_attention():
    from fxprune.tools.zoo import Stack

    torch.manual_seed(0)
    program = fxprune.analyse(Stack(norm_first=False).eval())  # before: the encoder a module called whole
    assert [block.name for block in program.blocks] == [f"encoder.layers.{i}" for i in range(3)]
    assert all(block.reducible for block in program.blocks)


class _SequenceFirst(nn.Module):
    """Tokens ``[B, N, C]`` through ``nn.TransformerEncoder`` layers laid out ``[N, B, C]`` (PyTorch's default),
    pooled in that layout (a sum over its first axis: an op that depends on the layout, so the tokens stay
    sequence first; ``fxprune.capture.layout``)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(48, 3, 96), 2, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(tokens.transpose(0, 1)).sum(0)


def test_a_sequence_first_stream_is_refused_saying_so():
    program = fxprune.analyse(_SequenceFirst().eval(), torch.randn(2, 17, 48))  # before: "windowed attention"
    assert {block.refusal.split(":")[0] for block in program.blocks} == {
        "the stream entering it is sequence first ([17, 2, 48]"}


def test_attention_of_learned_queries_alone_is_listed_and_left_as_is():
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    torch.manual_seed(0)  # the decoder's first self-attention reads its learned queries only
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                            out_features=["stage4"])
    detector = DetrForObjectDetection(DetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32, encoder_layers=2,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, num_queries=5, num_labels=10)).eval()
    program = fxprune.analyse(detector, (torch.randn(2, 3, 64, 64),))  # before: a KeyError
    assert [block.name for block in program.blocks] == [
        "model.encoder.layers.0", "model.encoder.layers.1", "model.decoder.layers.0.encoder_attn"]
    assert program.unrecognised == ["attention scaled_dot_product_attention_2 in model.decoder.layers.0.self_attn "
                                    "(computed from no value of the input: learned queries attending to each other)"]


class _QueriesAlone(torch.nn.Module):
    """Attention of learned queries [B, 2, 4, 8] among themselves, added to a pooled image: none over the input."""

    def __init__(self):
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(1, 2, 4, 8))

    def forward(self, x):
        q = self.queries.expand(x.shape[0], -1, -1, -1)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q).flatten(1) + x.mean((1, 2, 3))[:, None]


def test_a_model_whose_only_attention_reads_no_value_of_the_input_is_refused_saying_so():
    with pytest.raises(UnsupportedModelError, match=r"found no attention over the input's tokens whose result the "
                       r"output reads in _QueriesAlone: attention scaled_dot_product_attention in forward \(computed "
                       r"from no value"):
        fxprune.analyse(_QueriesAlone(), (torch.randn(2, 3, 8, 8),))


class _TwoInputs(torch.nn.Module):
    """One timm ViT called on each of two inputs, its logits subtracted (a siamese model)."""

    def __init__(self):
        super().__init__()
        self.vit = timm_vit("vit_tiny_patch16_224", depth=2)

    def forward(self, a, b):
        return self.vit(a) - self.vit(b)


def test_an_attention_on_a_second_input_is_left_as_is_naming_that_input_and_the_module_to_transform():
    model, images = _TwoInputs(), (torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    program = fxprune.analyse(model, images)
    assert [block.name for block in program.blocks] == ["vit.blocks.0", "vit.blocks.1"]
    assert all(block.reducible for block in program.blocks)
    assert len(program.unrecognised) == 2  # before: "computed from no value of the input: learned queries"
    assert all("vit.blocks." in text and "(computed from the input b, not a, whose token stream fxprune reduces: "
               "transform vit on its own, model.vit = fxprune.transform(model.vit, policy), to reduce each of its "
               "calls)" in text for text in program.unrecognised)
    plan = str(fxprune.transform(model, EViT(0.5, (1,)), images).fxprune_plan)
    assert "note: not recognised as attention, left as is: attention" in plan and "the input b, not a" in plan


def test_a_module_called_on_two_views_is_refused_naming_the_module_to_transform_which_then_reduces_both():
    from fxprune.tools.zoo import Towers

    torch.manual_seed(0)
    model, images = Towers(views=True).eval(), torch.randn(3, 3, 32, 32)
    program = fxprune.analyse(model)
    assert [block.name for block in program.blocks] == ["a"] * 3 + ["a@1"] * 3  # its attention is in its forward
    assert {block.refusal for block in program.blocks} == {
        "a runs on 2 token streams (it is called once for each, e.g. on views of the input), which the output joins "
        "only after their blocks; fxprune reduces one token stream: transform a itself, model.a = "
        "fxprune.transform(model.a, policy), and every call runs the rewritten graph"}  # before: "not a [B, N, C] …"
    with pytest.raises(UnsupportedModelError, match=r"to block 1 \(a\): a runs on 2 token streams .* No "
                       r"block of Towers is reducible\.$"):
        fxprune.transform(model, EViT(0.5, (1,)))
    reduced = fxprune.transform(model.a, EViT(0.5, (1,)))
    model.a = reduced
    torch.testing.assert_close(model(images), reduced(images) + reduced(images.flip(-1)))
    assert reduced.fxprune_plan.macs_after < reduced.fxprune_plan.macs_before


def test_an_ensemble_is_refused_naming_each_tower():
    from fxprune.tools.zoo import Towers

    program = fxprune.analyse(Towers(views=False).eval())
    assert [block.name for block in program.blocks] == ["a"] * 3 + ["b"] * 3
    assert {block.refusal for block in program.blocks} == {
        "the model's attention runs on 2 token streams (a, b: an ensemble, or a model with several towers), which the "
        "output joins only after their blocks; fxprune reduces one token stream: transform each on its own, e.g. "
        "model.a = fxprune.transform(model.a, policy)"}


def test_parallel_attentions_of_a_block_are_one_token_stream_and_refused_naming_each_other():
    program = fxprune.analyse(timm_vit("vit_small_patch16_18x2_224", img_size=32, patch_size=8, depth=2))
    assert [block.refusal.split(" in one")[0] for block in program.blocks[:2]] == [
        "its attention runs beside blocks.0.attns.1.attn", "its attention runs beside blocks.0.attns.0.attn"]
    assert all("(parallel attentions)" in block.refusal for block in program.blocks)


def test_differential_attention_is_refused_as_two_maps_one_module_combines_not_as_parallel_attentions():
    program = fxprune.analyse(timm_vit("vit_dwee_patch16_reg1_gap_256", img_size=32, patch_size=8, depth=2))
    assert [block.attention.module for block in program.blocks] == ["blocks.0.attn"] * 2 + ["blocks.1.attn"] * 2
    assert {block.refusal.split(" (")[0] for block in program.blocks} == {
        f"its module blocks.{i}.attn computes 2 attention maps over the tokens and combines them" for i in (0, 1)}
    assert all("one map per head" in block.refusal for block in program.blocks)


class _AttentionUnread(torch.nn.Module):
    """Attention over the patches ``[B, 1, 4, 8]`` whose result the output never reads (it is the patches' mean)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 8, 4, 4)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)[:, None]
        torch.nn.functional.scaled_dot_product_attention(tokens, tokens, tokens)
        return tokens.mean((1, 2))


def test_a_model_whose_output_reads_none_of_its_attention_is_refused_saying_so():
    with pytest.raises(UnsupportedModelError, match=r"found no attention over the input's tokens whose result the "
                       r"output reads in _AttentionUnread: attention scaled_dot_product_attention in forward \(the "
                       r"output reads nothing it computes"):  # before: "… is computed from no value of the input"
        fxprune.analyse(_AttentionUnread(), (torch.randn(2, 3, 8, 8),))


def test_summary_lists_every_block_with_its_status():
    text = str(fxprune.analyse(timm_vit("deit_small_distilled_patch16_224")))
    assert "4 attention blocks, 18 tokens × 384 channels (2 prefix token(s), class token: yes)" in text
    assert text.count("reducible") == 4


def test_the_analysis_lists_the_position_terms_of_each_block():
    program = fxprune.analyse(with_position_bias_in_block_3())
    terms = [[str(term) for term in b.position_terms] for b in program.blocks]
    assert terms == [[], [], [], ["stages.3.mix.bias [3, 17, 17]"]]
    assert "stages.3.mix.bias  reducible" in str(program)


def _zoo(name: str) -> torch.nn.Module:
    from fxprune.tools.zoo import ZOO

    return next(entry for entry in ZOO if entry.name == name).build()


@pytest.mark.parametrize("name, beside", [
    ("vit_base_patch16_xp_224", "blocks.{}.mlp_act"),  # one projection makes q, k, v and the MLP's hidden units
    ("hand-written: parallel blocks (x + attention(x) + mlp(x))", "looks.{}.b"),  # (x + attention) + mlp
], ids=["timm-fused-projection", "hand-written"])
def test_a_parallel_block_is_reducible_after_both_branches_and_names_the_branch_beside_its_attention(name, beside):
    program = fxprune.analyse(_zoo(name))
    assert all(b.reducible and b.beside == beside.format(b.index) for b in program.blocks)
    assert all({b.parallel, b.attention.output} <= ancestors([b.mid]) for b in program.blocks)  # after both
    assert "reducible (parallel block: after both branches)" in str(program)


class _SummedBranches(nn.Module):
    """Blocks ``x + (attention(x) + mlp(x))``: the parallel branches summed before the residual addition."""

    image_size = 32

    def __init__(self):
        super().__init__()
        self.vit = hand_written_vit()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit.embed(images)
        for stage in self.vit.stages:
            x = x + (stage.mix(stage.pre_mix(x)) + stage.ffn(stage.pre_ffn(x)))
        return self.vit.classifier(x[:, 0])


def test_summed_parallel_branches_are_reduced_after_their_sum_and_adavit_refuses_them_saying_why():
    torch.manual_seed(0)
    model = _SummedBranches().eval()
    program = fxprune.analyse(model)
    assert [b.beside for b in program.blocks] == [f"vit.stages.{i}.pre_ffn" for i in range(len(program.blocks))]
    gm = fxprune.transform(model, EViT(0.5, (1, 2)))
    x = torch.randn(3, 3, 32, 32)
    assert_each_image_gets_what_it_gets_alone(gm, x)
    with pytest.raises(UnsupportedModelError, match=r"its MLP runs beside its attention from the block input \(a "
                       r"parallel block, from vit.stages.1.pre_ffn\), where adavit gates"):
        fxprune.transform(model, fxprune.AdaViT(0.5, (1,)))


def test_rotary_tables_computed_from_the_patch_grid_are_position_terms():
    program = fxprune.analyse(_zoo("vit_small_patch16_dinov3"))  # a shape read builds them, not a parameter
    assert all(b.position_terms and all(t.axes == (0,) and t.patches_only for t in b.position_terms)
               for b in program.blocks)


def test_reads_of_a_modules_other_outputs_beside_its_tokens_leave_the_stream_through_every_block():
    from transformers import ViTMAEConfig, ViTMAEModel

    torch.manual_seed(0)  # the embeddings give (tokens, mask, ids_restore); the output reads all three
    model = ViTMAEModel(ViTMAEConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=3,
                                     num_attention_heads=3, intermediate_size=96, mask_ratio=0.5)).eval()
    program = fxprune.analyse(model)  # before: "the stream entering it is None" in every block
    assert [block.reducible for block in program.blocks] == [True] * 3
    x = torch.randn(3, 3, 32, 32)
    for policy in (fxprune.ToMe(0, (1, 2)), fxprune.EViT(1.0, (1, 2))):  # the masking draws noise: same seed
        reduced = fxprune.transform(model, policy)
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        out = reduced(x)
        torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=0)
        assert torch.equal(out.mask, expected.mask) and torch.equal(out.ids_restore, expected.ids_restore)


def test_a_model_that_returns_its_attention_maps_is_refused_saying_so():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=3,
                                                num_attention_heads=3, intermediate_size=96, output_attentions=True,
                                                attn_implementation="eager")).eval()
    program = fxprune.analyse(model)  # before: "the token stream leaves the tokens before its attention's output"
    assert all(block.refusal.startswith("the model's output reads the attention maps of vit.layers.0.attention, "
                                        "vit.layers.1.attention, vit.layers.2.attention (Hugging Face's "
                                        "output_attentions=True)") for block in program.blocks)
    model.config.output_attentions = False
    assert all(block.reducible for block in fxprune.analyse(model).blocks)


def test_an_output_that_also_reads_the_input_apart_from_the_tokens_keeps_its_token_stream():
    from transformers import ViTConfig, ViTForMaskedImageModeling

    torch.manual_seed(0)  # its loss compares the pixels with the reconstruction from the tokens
    model = ViTForMaskedImageModeling(ViTConfig(
        image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
        intermediate_size=96, encoder_stride=8)).eval()
    images, masked = torch.randn(3, 3, 32, 32), torch.rand(3, 16) > 0.5
    inputs = {"pixel_values": images[:2], "bool_masked_pos": masked[:2]}
    program = fxprune.analyse(model, inputs)  # before: every block "the stream entering it is (2, 3, 32, 32)"
    assert all(block.reducible for block in program.blocks) and program.tokens == 17
    fast = fxprune.transform(model, fxprune.ToMe(2, (0, 1, 2)), example_inputs=inputs)
    with torch.no_grad():
        out = fast(pixel_values=images, bool_masked_pos=masked).reconstruction
        torch.testing.assert_close(out[1:], fast(pixel_values=images[1:], bool_masked_pos=masked[1:]).reconstruction,
                                   atol=1e-5, rtol=0)


class _LucidAttention(nn.Module):
    """Attention written as vit-pytorch writes it: the shape star-unpacked, ``map`` over ``chunk``, ``torch.finfo``
    of the scores' dtype, an explicit softmax."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.norm, self.qkv, self.out = heads, nn.LayerNorm(width), nn.Linear(width, 3 * width), \
            nn.Linear(width, width)

    def forward(self, x):
        b, n, _, h = *x.shape, self.heads
        q, k, v = map(lambda t: t.reshape(b, n, h, -1).transpose(1, 2), self.qkv(self.norm(x)).chunk(3, dim=-1))
        dots = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        dots = dots.clamp(min=-torch.finfo(dots.dtype).max)
        return x + self.out((dots.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))


class _LucidViT(nn.Module):
    """Blocks of :class:`_LucidAttention` alone (no MLP), 16 patches averaged at the end, ``heads`` heads of 32
    channels in all (2: as many channels per head as there are patches)."""

    image_size = 32

    def __init__(self, heads: int):
        super().__init__()
        self.patches = nn.Conv2d(3, 32, 8, stride=8)
        self.blocks = nn.Sequential(*(_LucidAttention(32, heads) for _ in range(3)))
        self.head = nn.Linear(32, 5)

    def forward(self, images):
        return self.head(self.blocks(self.patches(images).flatten(2).transpose(1, 2)).mean(1))


@pytest.mark.parametrize("heads", [4, 2])
def test_attention_written_as_vit_pytorch_writes_it_is_found_and_reduced_image_by_image(heads):
    torch.manual_seed(0)
    model = _LucidViT(heads).eval()
    program = fxprune.analyse(model)  # before: each block kept whole ("len" of x.shape; torch.finfo of a dtype)
    assert program.trace.leaves == [] and [block.reducible for block in program.blocks] == [True] * 3
    x = image_batch(model, batch=3)  # with 16 channels per head, "@ v" was taken for a step between q @ kᵀ and it
    for policy in (fxprune.EViT(0.5, (1, 2)), fxprune.ToMe(2, (0, 1, 2))):
        fast = fxprune.transform(model, policy)  # before: an internal error, the blocks having no MLP
        with torch.no_grad():
            torch.testing.assert_close(fast(x)[1:], fast(x[1:]), atol=1e-5, rtol=0)
    assert_same_outputs(fxprune.transform(model, fxprune.EViT(1.0, (1, 2))), model)
