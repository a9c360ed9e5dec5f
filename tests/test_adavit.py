"""AdaViT: the masked training and evaluation graphs against an eager float64 implementation of the official
block, decisions per image, gradients, and the policy."""

import collections
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from reference import adavit_own_attention, adavit_vit
from vits import hf_vit, image_batch, logits, timm_vit, with_explicit_softmax

import fxprune
from fxprune.methods.adavit import HEADS_KEY, SUBLAYERS_KEY, TOKEN_THRESHOLD, TOKENS_KEY, AdaViT, set_usage
from fxprune.ops.gating import project_from_heads, project_head_channels, project_heads
from fxprune.passes.skipping import calls_of


def _gates(gm, depth):
    gates = {}
    for i in range(depth):
        try:
            block = gm.get_submodule(f"fxprune.blocks_{i}")
        except AttributeError:
            continue
        gates[i] = dict(block.named_children())
    return gates


def _model():
    return timm_vit("deit_small_patch16_224").double()


def _rope_model():
    return timm_vit("vit_small_patch16_rope_224", img_size=32, patch_size=8, depth=4).double()


def _joined_bias_model():
    """BEiT, read at its class token: its q, k, v bias is cat(q_bias, k_bias, v_bias), computed in the graph."""
    model = timm_vit("beit_base_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=64, num_heads=2,
                     global_pool="token").double()
    torch.nn.init.normal_(model.head.weight)  # timm starts this head at zero
    return model


def test_evaluation_graph_matches_the_official_block_in_float64():
    model = _model()
    gm = fxprune.transform(model, AdaViT(0.5))
    x = image_batch(model, batch=4, dtype=torch.float64)
    gates = _gates(gm, len(model.blocks))
    assert sorted(gates) == list(range(len(model.blocks))) and set(gates[0]) == {"tokens"}
    with torch.no_grad(), fxprune.collect() as aux:
        out = gm(x)
    torch.testing.assert_close(out, adavit_vit(model, gates, x, token_only=(0,)), atol=1e-10, rtol=0)
    heads = torch.cat([v[-1] for k, v in aux.items() if k.startswith(HEADS_KEY)])
    tokens = torch.cat([v[-1] for k, v in aux.items() if k.startswith(TOKENS_KEY)])
    assert 0 < heads.mean() < 1 and 0 < tokens.mean() < 1  # untrained heads: a mix of used and unused


def _assert_skipping_computes_what_masking_does(model, policy):
    """``model`` with ``policy(skip=True)``, its decision heads set to a random usage, equals it with
    ``policy(skip=False)`` and the same heads on four images (float64), batched and each alone, and runs fewer
    MACs."""
    masked, skipping = fxprune.transform(model, policy(False)), fxprune.transform(model, policy(True))
    x = image_batch(model, batch=4, dtype=torch.float64)
    with torch.no_grad():
        set_usage(skipping, image_batch(model, batch=4, seed=5, dtype=torch.float64), 0.5)
        masked.load_state_dict(skipping.state_dict())
        out = masked(x)
        torch.testing.assert_close(skipping(x), out, atol=1e-10, rtol=0)
        for i in range(4):
            torch.testing.assert_close(skipping(x[i : i + 1]), out[i : i + 1], atol=1e-10, rtol=0)
            torch.testing.assert_close(masked(x[i : i + 1]), out[i : i + 1], atol=1e-10, rtol=0)
        assert fxprune.flops(skipping, x[:1]) < 0.9 * fxprune.flops(masked, x[:1])


def _rotary_reference(model, gates, x, **options):
    tokens, rope = model._pos_embed(model.patch_embed(x))
    return adavit_own_attention(model, gates, model.norm_pre(tokens), rope=rope, **options)


def test_on_a_rotary_vit_masking_matches_the_official_block_and_skipping_takes_the_tables_at_the_used_rows():
    model = _rope_model()
    torch.nn.init.normal_(model.head.weight)  # timm starts this head at zero
    masked = fxprune.transform(model, AdaViT(0.5, skip=False))
    x = image_batch(model, batch=4, dtype=torch.float64)
    gates = _gates(masked, len(model.blocks))
    with torch.no_grad(), fxprune.collect() as aux:
        out = masked(x)
        torch.testing.assert_close(out, _rotary_reference(model, gates, x, token_only=(0,)), atol=1e-10, rtol=0)
        assert (out - model(x)).abs().max() > 1e-3
    tokens = torch.cat([v[-1] for k, v in aux.items() if k.startswith(TOKENS_KEY)])
    assert 0.2 < tokens.mean() < 0.8
    skipping = fxprune.transform(model, AdaViT(0.5))
    skipping.load_state_dict(masked.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(skipping(x), out, atol=1e-10, rtol=0)
        for i in range(4):
            torch.testing.assert_close(skipping(x[i : i + 1]), out[i : i + 1], atol=1e-10, rtol=0)
            assert fxprune.flops(skipping, x[i : i + 1]) < 0.8 * fxprune.flops(masked, x[i : i + 1])
    training = fxprune.transform(model, AdaViT(0.5, layers=(1, 2))).train()  # blocks 0 and 3 without decisions
    torch.manual_seed(5)
    out = training(x)
    torch.manual_seed(5)
    reference = _rotary_reference(model.train(), _gates(training, len(model.blocks)), x, training=True)
    torch.testing.assert_close(out, reference, atol=1e-10, rtol=0)


def test_a_relative_position_bias_is_taken_at_the_used_rows_and_heads():
    from vits import with_position_bias_in_block_3

    relpos = timm_vit("vit_relpos_medium_patch16_cls_224", img_size=32, patch_size=8, depth=3).double()
    torch.nn.init.normal_(relpos.head.weight)  # timm starts this head at zero
    x = image_batch(relpos, batch=4, dtype=torch.float64)
    masked = fxprune.transform(relpos, AdaViT(0.5, skip=False))
    with torch.no_grad():
        tokens = torch.cat([relpos.cls_token.expand(4, -1, -1), relpos.patch_embed(x)], dim=1)
        reference = adavit_own_attention(relpos, _gates(masked, 3), tokens, token_only=(0,))
        torch.testing.assert_close(masked(x), reference, atol=1e-10, rtol=0)
    biased = with_position_bias_in_block_3().double()  # a bias on explicit logits, whose heads are masked
    for model, layers in ((relpos, None), (biased, (3,))):  # relpos: a bias per head in the SDPA mask
        _assert_skipping_computes_what_masking_does(
            model, lambda skip, layers=layers: AdaViT(0.5, layers, skip=skip, init_logit=0.0))


def test_a_vit_whose_qkv_bias_is_joined_from_parameters_skips_what_it_masks():
    _assert_skipping_computes_what_masking_does(_joined_bias_model(),
                                                lambda skip: AdaViT(0.5, skip=skip, init_logit=0.0))


def test_after_a_block_that_removes_rows_skipping_takes_the_tables_at_the_used_rows_original_positions():
    rotary = _rope_model()
    torch.nn.init.normal_(rotary.head.weight)

    _assert_skipping_computes_what_masking_does(rotary, lambda skip: fxprune.Compose(
        [fxprune.TopK(0.7, layers=(1,)), AdaViT(0.5, layers=(2, 3), skip=skip, init_logit=0.0)]))


def _dynamically_quantized(model: torch.nn.Module) -> torch.nn.Module:
    quantize = getattr(torch.ao.quantization, "quantize_dynamic", None)  # deprecated in torch 2.10
    if quantize is None:
        pytest.skip("this torch has no torch.ao.quantization.quantize_dynamic")
    return quantize(model, {torch.nn.Linear}, dtype=torch.qint8)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # torch's own deprecation
def test_a_quantized_projection_is_refused_naming_its_layer_while_parameter_free_methods_reduce_the_model():
    quantized = _dynamically_quantized(timm_vit("deit_small_patch16_224", depth=3))
    with pytest.raises(fxprune.UnsupportedModelError,
                       match=r"queries come from blocks.1.attn.qkv, a torch.ao.nn.quantized.dynamic.*Linear, not an "):
        fxprune.transform(quantized, AdaViT(0.5, layers=(1,)))
    x = image_batch(quantized)
    with torch.no_grad():
        torch.testing.assert_close(fxprune.transform(quantized, fxprune.EViT(1.0, (1, 2)))(x), quantized(x),
                                   atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # torch's own deprecation
def test_a_skipping_graph_quantized_after_the_transform_is_refused_naming_the_layer_and_the_masked_form_runs():
    model = timm_vit("deit_small_patch16_224", depth=3)
    x = image_batch(model)
    skipping = _dynamically_quantized(fxprune.transform(model, AdaViT(0.5, layers=(1,), init_logit=0.0)))
    with pytest.raises(fxprune.UnsupportedModelError, match=r"reads blocks\.1\.attn\.\w+\.\w+ as the parameter it was "
                       r"when it was transformed, and blocks\.1\.attn\.\w+ is now a torch\.ao\.nn\.quantized\.dynamic"
                       r".*Linear whose \w+ is not .* skip=False"):  # before: KeyError 'bias'
        skipping(x)
    masked = fxprune.transform(model, AdaViT(0.5, layers=(1,), init_logit=0.0, skip=False))
    with torch.no_grad():
        expected = masked(x)
        torch.testing.assert_close(_dynamically_quantized(masked)(x), expected, atol=0.1, rtol=0)


class _Adapted(torch.nn.Module):
    """A linear layer with a low-rank adapter beside it, as LoRA adds one: ``base(x) + up(down(x))``."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x * 1.0))


def test_an_mlp_with_an_adapter_beside_its_first_layer_is_refused_naming_both_and_how_to_merge():
    model = timm_vit("deit_small_patch16_224", depth=3)
    model.blocks[1].mlp.fc1 = _Adapted(model.blocks[1].mlp.fc1)
    with pytest.raises(fxprune.UnsupportedModelError, match=r"blocks.1: its MLP does not start with linear layers on "
                       r"one input \(it starts with blocks.1.mlp.fc1.base, blocks.1.mlp.fc1.down: an adapter beside a "
                       r"layer, such as LoRA's, is merged into it first"):
        fxprune.transform(model, AdaViT(0.5, layers=(1,)))


def test_training_graph_matches_the_official_block_with_the_same_noise():
    model = _model()
    gm = fxprune.transform(model, AdaViT(0.5, layers=(1, 2))).train()
    x = image_batch(model, batch=3, dtype=torch.float64)
    gates = _gates(gm, len(model.blocks))
    torch.manual_seed(5)
    out = gm(x)
    torch.manual_seed(5)
    reference = adavit_vit(model.train(), gates, x, training=True)
    torch.testing.assert_close(out, reference, atol=1e-10, rtol=0)


def test_gradients_reach_every_decision_head_and_the_backbone():
    model = timm_vit("deit_small_patch16_224")
    gm = fxprune.transform(model, AdaViT(0.5, layers=(1, 2))).train()
    with fxprune.collect() as aux:
        logits = gm(image_batch(model, batch=4))
    usage = sum(v[-1].mean() for k, v in aux.items() if k.startswith((HEADS_KEY, SUBLAYERS_KEY, TOKENS_KEY)))
    (logits.square().mean() + usage).backward()
    for name in ("heads", "sublayers", "tokens"):
        grad = gm.get_submodule(f"fxprune.blocks_1.{name}").weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert gm.get_parameter("blocks.1.attn.qkv.weight").grad.abs().sum() > 0


def test_decisions_are_per_image():
    model = _model()
    gm = fxprune.transform(model, AdaViT(0.5))
    x = image_batch(model, batch=4, dtype=torch.float64)
    with torch.no_grad():
        alone = torch.cat([gm(x[i : i + 1]) for i in range(4)])
        torch.testing.assert_close(gm(x), alone, atol=1e-12, rtol=0)


def test_policy_parses_binds_the_official_blocks_and_says_it_is_untrained():
    policy = fxprune.parse_policy("adavit:usage=0.5")
    assert policy == AdaViT(0.5)
    assert fxprune.parse_policy("adavit:usage=0.5,decides=heads,tokens") == AdaViT(0.5, decides=("tokens", "heads"))
    assert AdaViT(0.5, decides=("heads",)).bind(6).layers == (1, 2, 3, 4, 5)  # no token decisions in block 0
    bound = policy.bind(6)
    assert bound.layers == tuple(range(6)) and bound.token_only == (0,)
    text = str(fxprune.plan(timm_vit("deit_small_patch16_224"), policy))
    assert "untrained" in text and "heads, sub-layers, patches decided per image" in text
    with pytest.raises(fxprune.PolicyError, match="usage must be in"):
        AdaViT(0.0)


def _official_usage_loss(heads, layers, tokens, target):
    """``AdaLoss`` of the official code without its classification term: heads ``[B, L, H]``, layers ``[B, L, 2]``,
    tokens ``[B, L', N]``."""
    mask = (layers.sum(-1, keepdim=True) > 0).float().expand(-1, -1, heads.shape[-1])
    head_loss = ((heads * mask).sum() / (mask.sum() + 1e-6) - target).abs()
    layer_loss = (layers.mean() - target).abs()
    token_loss = (tokens.mean() - target) ** 2
    return 2 * head_loss + 2 * layer_loss + 2 * token_loss


def test_loss_is_the_official_usage_loss_plus_cross_entropy():
    torch.manual_seed(0)
    heads = (torch.rand(4, 3, 6) > 0.4).float()
    layers = (torch.rand(4, 3, 2) > 0.5).float()
    layers[0, 1] = 0  # a block using neither sub-layer: its heads do not count
    tokens = (torch.rand(4, 4, 17) > 0.3).float()
    tokens[..., 0] = 1
    aux = {f"{HEADS_KEY}blocks.{i + 1}": [heads[:, i]] for i in range(3)}
    aux.update({f"{SUBLAYERS_KEY}blocks.{i + 1}": [layers[:, i]] for i in range(3)})
    aux.update({f"{TOKENS_KEY}blocks.{i}": [tokens[:, i]] for i in range(4)})
    logits, labels = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    loss, parts = fxprune.losses.AdaViTLoss(None, AdaViT(0.5))(None, logits, aux, labels)
    expected = torch.nn.functional.cross_entropy(logits, labels) + _official_usage_loss(heads, layers, tokens, 0.5)
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"cls", "heads", "sublayers", "tokens"}


def test_loss_counts_only_the_kinds_the_policy_decides():
    heads, layers, tokens = torch.ones(2, 4), torch.ones(2, 2), torch.ones(2, 17)
    aux = {f"{HEADS_KEY}blocks.1": [heads], f"{SUBLAYERS_KEY}blocks.1": [layers], f"{TOKENS_KEY}blocks.1": [tokens]}
    logits, labels = torch.randn(2, 10), torch.tensor([1, 2])
    ce = torch.nn.functional.cross_entropy(logits, labels)
    for kinds, extra in ((("heads",), 2 * 0.5), (("sublayers", "tokens"), 2 * 0.5 + 2 * 0.25)):
        loss, parts = fxprune.losses.AdaViTLoss(None, AdaViT(0.5, decides=kinds))(None, logits, aux, labels)
        assert set(parts) == {"cls", *kinds}
        torch.testing.assert_close(loss, ce + extra)


def test_the_target_usage_warms_up_from_one_in_training():
    from fxprune.tools.datasets import DigitScenes
    from fxprune.tools.models import digits_vit

    model, data = digits_vit(), DigitScenes("train", 32, seed=0)
    policy = AdaViT(0.5, layers=(1, 2), init_logit=20.0)  # every part used: usage 1
    losses = {}
    for warmup in (0, 4):
        config = fxprune.TrainConfig(steps=1, batch_size=16, lr=0.0, keep_warmup=warmup)
        losses[warmup] = fxprune.train(model, policy, data, config, progress=False).losses[0]
    assert losses[0] - losses[4] == pytest.approx(2 * 0.5 + 2 * 0.5 + 2 * 0.25, abs=1e-5)  # terms at γ 0.5 vs 1


@pytest.mark.parametrize("kind", ["heads", "sublayers", "tokens"])
def test_deciding_one_kind_uses_every_other_part_and_adds_only_its_decision_heads(kind):
    model = timm_vit("deit_small_patch16_224", depth=3).double()
    x = image_batch(model, batch=3, dtype=torch.float64)
    one = fxprune.transform(model, AdaViT(0.5, decides=(kind,), init_logit=-20.0))  # decides: nothing used
    assert {name.rsplit(".", 2)[-2] for name, _ in one.named_parameters() if name.startswith("fxprune.")} == {kind}
    every = fxprune.transform(model, AdaViT(0.5, init_logit=20.0, skip=False))  # decides all: everything used
    for name, module in every.named_modules():
        if name.endswith(f".{kind}"):
            module.bias.data.fill_(-20.0)
    with torch.no_grad():
        torch.testing.assert_close(one(x), every(x), atol=1e-10, rtol=0)
    assert "only" in fxprune.AdaViT(0.5, decides=(kind,)).describe()
    with pytest.raises(fxprune.PolicyError, match="decides must name"):
        AdaViT(0.5, decides=("patches",))


def test_trainer_moves_the_decisions_towards_the_target_usage():
    from fxprune.tools.datasets import DigitScenes
    from fxprune.tools.models import digits_vit

    model, data = digits_vit(), DigitScenes("train", 64, seed=0)
    policy = AdaViT(0.3, layers=(1, 2, 3, 4), init_logit=3.0)  # starts using almost everything
    config = fxprune.TrainConfig(steps=8, batch_size=16, warmup=1, lr=2e-2)
    result = fxprune.train(model, policy, data, config, progress=False)
    images = torch.stack([data[i][0] for i in range(16)])

    def usage(gm):
        with torch.no_grad(), fxprune.collect() as aux:
            gm.train()(images)
        return torch.cat([v[-1].flatten() for k, v in aux.items() if k.startswith(HEADS_KEY)]).mean()

    torch.manual_seed(0)
    before = usage(fxprune.transform(model, policy))
    torch.manual_seed(0)
    assert usage(result.model) < before - 0.1


def _masked_and_skipping(model, **options):
    masked = fxprune.transform(model, AdaViT(0.5, skip=False, **options))
    if "init_logit" not in options:
        with torch.no_grad():  # token logits spread around the threshold, sigmoid(0.405) = 0.6: a mix of rows
            for name, head in masked.named_modules():
                if name.endswith(".tokens"):
                    head.weight.mul_(20.0)
                    head.bias.fill_(0.405)
    skipping = fxprune.transform(model, AdaViT(0.5, **options))
    skipping.load_state_dict(masked.state_dict())  # the same decision heads
    return masked, skipping


def _usage(gm, x):
    with torch.no_grad(), fxprune.collect() as aux:
        gm(x)
    return {key: values[-1] for key, values in aux.items()}


@pytest.mark.parametrize("build", [_model, lambda: with_explicit_softmax(_model()), lambda: hf_vit().double()],
                         ids=["timm", "explicit-softmax", "hf"])
def test_skipping_graph_equals_the_masked_graph_batched_and_alone(build):
    model = build()
    masked, skipping = _masked_and_skipping(model)
    x = image_batch(model, batch=6, dtype=torch.float64)
    usage = _usage(masked, x)
    sublayers = torch.stack([v for k, v in usage.items() if k.startswith(SUBLAYERS_KEY)])  # [blocks, B, 2]
    rows = torch.stack([v for k, v in usage.items() if k.startswith(TOKENS_KEY)]).sum(-1)  # [blocks, B]
    assert (sublayers == 0).any() and (sublayers == 1).any()  # some images skip a sub-layer that others run
    assert (rows.amax(1) - rows.amin(1)).max() >= 4  # and use different numbers of rows
    with torch.no_grad():
        expected = logits(masked(x))
        torch.testing.assert_close(logits(skipping(x)), expected, atol=1e-10, rtol=0)
        alone = torch.cat([logits(skipping(x[i : i + 1])) for i in range(len(x))])
        torch.testing.assert_close(alone, expected, atol=1e-10, rtol=0)


def test_under_torch_compile_the_skipping_graph_runs_eagerly_and_the_training_graph_compiles():
    model = timm_vit("vit_tiny_patch16_224", depth=3)
    skipping = fxprune.transform(model, AdaViT(0.5))
    x = image_batch(model, batch=4)
    graphs = []

    def recording(gm, example_inputs):  # a backend that keeps each graph dynamo hands it and runs it as it is
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        set_usage(skipping, image_batch(model, batch=4, seed=5), 0.5)
        rows = _usage(skipping, x)[f"{TOKENS_KEY}blocks.1"].sum(1)
        assert rows.amax() > rows.amin()  # images use different numbers of rows
        expected = skipping(x)
        torch._dynamo.reset()
        compiled = torch.compile(skipping, dynamic=True, backend=recording)
        torch.testing.assert_close(compiled(x), expected, atol=0, rtol=0)
        alone = torch.cat([compiled(x[i : i + 1]) for i in range(len(x))])
        torch.testing.assert_close(alone, expected, atol=1e-5, rtol=0)
        assert graphs == []  # nothing of it compiled: each image got eager skipping's output
        skipping.train()
        assert compiled(x).shape == expected.shape
    assert any(node.target is F.scaled_dot_product_attention for graph in graphs for node in graph.graph.nodes)
    torch._dynamo.reset()


def test_skipping_adds_each_sub_layer_into_the_stream_in_place_and_leaves_its_input_and_weights_as_they_were():
    from fxprune.ops.gating import add_used_rows

    model = _model()
    masked, skipping = _masked_and_skipping(model)
    sums = calls_of(skipping, add_used_rows)
    assert len(sums) == 2 * len(model.blocks) and all(node.kwargs.get("in_place") for node in sums)
    x = image_batch(model, batch=4, dtype=torch.float64)
    given, weights = x.clone(), {key: value.clone() for key, value in skipping.state_dict().items()}
    with torch.no_grad():
        expected = logits(masked(x))
        torch.testing.assert_close(logits(skipping(x)), expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(logits(skipping(x)), expected, atol=1e-10, rtol=0)  # with gradients: sums copied
    assert torch.equal(x, given) and all(torch.equal(value, weights[key])
                                         for key, value in skipping.state_dict().items())


def test_a_model_whose_capture_has_guards_also_sums_in_place():
    import timm

    from fxprune.ops.gating import add_used_rows
    from fxprune.passes.guards import check_guard

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                              num_classes=5, dynamic_img_size=True).eval()  # resamples positions: guards
    skipping = fxprune.transform(model, AdaViT(0.5, init_logit=0.0))
    assert skipping.graph.find_nodes(op="call_function", target=check_guard)
    sums = calls_of(skipping, add_used_rows)
    assert len(sums) == 6 and all(node.kwargs.get("in_place") for node in sums)  # before: none (a guard had no example)


def test_skipping_graph_survives_deepcopy_and_save_load_and_adds_no_state_dict_keys(tmp_path):
    import copy

    model = timm_vit("deit_small_patch16_224", depth=3).double()
    x = image_batch(model, batch=3, dtype=torch.float64)
    gm = fxprune.transform(model, AdaViT(0.5, init_logit=0.0))
    from fxprune.methods.adavit import set_usage

    set_usage(gm, x, 0.5)  # some sub-layers used by no image: not run at all
    masked = fxprune.transform(model, AdaViT(0.5, init_logit=0.0, skip=False))
    assert sorted(gm.state_dict()) == sorted(masked.state_dict())
    torch.save(gm, tmp_path / "gm.pt")
    loaded, copied = torch.load(tmp_path / "gm.pt", weights_only=False), copy.deepcopy(gm)
    with torch.no_grad():
        expected = gm(x)
        for other in (loaded, copied):
            torch.testing.assert_close(other(x), expected, atol=1e-12, rtol=0)
            torch.testing.assert_close(other(x[:1]), gm(x[:1]), atol=1e-12, rtol=0)
        for parameter in copied.parameters():
            parameter.add_(1.0)
        torch.testing.assert_close(gm(x), expected, atol=0, rtol=0)  # the copy has its own weights


def test_skipping_saves_the_macs_of_what_an_image_does_not_use():
    model = _model()
    masked, skipping = _masked_and_skipping(model)
    x = image_batch(model, batch=3, dtype=torch.float64)
    for i in range(3):
        assert fxprune.flops(skipping, x[i : i + 1]) < 0.8 * fxprune.flops(masked, x[i : i + 1])
    dense_masked, dense_skipping = _masked_and_skipping(model, init_logit=20.0)  # every part used
    assert fxprune.flops(dense_skipping, x[:1]) == fxprune.flops(dense_masked, x[:1])


def test_skipping_after_merged_tokens_is_refused_and_lower_asks_for_the_masked_graph_naming_every_data_dependent_op():
    from fxprune.ops.gating import used_heads

    model = timm_vit("deit_small_patch16_224")
    with pytest.raises(fxprune.UnsupportedModelError, match="skip=False"):
        fxprune.transform(model, fxprune.Compose([fxprune.ToMe(2, layers=(0,)), AdaViT(0.5, layers=(2, 3))]))
    skipping = fxprune.transform(model, AdaViT(0.5))
    assert not skipping.graph.find_nodes(op="call_function", target=used_heads)  # only the blocks' own graphs run it
    with pytest.raises(fxprune.FxPruneError, match=r"VisionTransformer with adavit usage 0\.5 .*\(.*used_heads, "
                                                    r"used_layout.*\).* cannot compile\. Transform with skip=False .* "
                                                    r"and lower that"):
        fxprune.lower(skipping)


def _official_checkpoint(model, heads: int) -> dict:
    """An official AdaViT checkpoint of ``model``'s shape: q, k, v split, random decision heads."""
    torch.manual_seed(3)
    state = {}
    for key, value in model.state_dict().items():
        if ".attn.qkv." in key:
            stem, _, leaf = key.partition(".attn.qkv.")
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                state[f"{stem}.attn.{name}.{leaf}"] = part + 0.01  # not the model's own weights
        else:
            state[key] = value
    dim = model.embed_dim
    for i in range(len(model.blocks)):
        state[f"blocks.{i}.attn.token_select.mlp_head.weight"] = torch.randn(1, dim, dtype=torch.float64)
        state[f"blocks.{i}.attn.token_select.mlp_head.bias"] = torch.full((1,), 0.4, dtype=torch.float64)
        if i:
            for name, width in (("head_select", heads), ("layer_select", 2)):
                state[f"blocks.{i}.{name}.mlp_head.weight"] = torch.randn(width, dim, dtype=torch.float64)
                state[f"blocks.{i}.{name}.mlp_head.bias"] = torch.zeros(width, dtype=torch.float64)
    return {"model": state}


def test_an_official_checkpoint_loads_its_decision_heads_and_backbone(tmp_path):
    from fxprune.methods.adavit import official_backbone

    model = _model()
    saved = _official_checkpoint(model, heads=model.blocks[0].attn.num_heads)
    torch.save(saved, tmp_path / "ada_step_deit.pth")
    assert not model.load_state_dict(official_backbone(saved), strict=True).missing_keys
    gm = fxprune.transform(model, AdaViT(0.5, weights=str(tmp_path / "ada_step_deit.pth")))
    state = saved["model"]
    gates = {}
    for i in range(len(model.blocks)):
        names = {"tokens": f"blocks.{i}.attn.token_select"}
        if i:
            names.update(heads=f"blocks.{i}.head_select", sublayers=f"blocks.{i}.layer_select")
        gates[i] = {}
        for ours, theirs in names.items():
            weight = state[f"{theirs}.mlp_head.weight"]
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0]).double()
            layer.load_state_dict({"weight": weight, "bias": state[f"{theirs}.mlp_head.bias"]})
            gates[i][ours] = layer
    x = image_batch(model, batch=3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), adavit_vit(model, gates, x, token_only=(0,)), atol=1e-10, rtol=0)
    assert "untrained" not in str(gm.fxprune_plan)


def test_show_draws_each_images_usage_and_reports_it_per_block(tmp_path, capsys):
    from fxprune.tools.cli import main
    from fxprune.tools.show import usage

    main(["show", "--policy", "adavit:usage=0.5,init=0.5", "--scenes", "3", "--out", str(tmp_path / "usage.png")])
    printed = capsys.readouterr().out
    assert (tmp_path / "usage.png").stat().st_size > 0
    assert "block 0: 65.0 of 65 rows used per image" in printed  # init 0.5 > logit(0.6): every row used
    assert "2.0 of 2 heads, attention 100%, MLP 100%" in printed  # sigmoid(0.5) > 0.5: every head and sub-layer
    model = timm_vit("deit_small_patch16_224")
    blocks = usage(fxprune.transform(model, AdaViT(0.5, layers=(1, 2))), image_batch(model, batch=3))
    assert [b.block for b in blocks] == [1, 2] and blocks[0].heads.shape == (3, model.blocks[0].attn.num_heads)


@pytest.mark.parametrize("build", [_model, lambda: hf_vit().double(), lambda: with_explicit_softmax(_model()),
                                   _rope_model, _joined_bias_model],
                         ids=["timm", "hf", "explicit-softmax", "rotary", "joined-qkv-bias"])
def test_unused_heads_are_not_computed_in_the_projections_around_the_attention(build):
    model = build()
    masked, skipping = _masked_and_skipping(model, init_logit=20.0)  # everything used, then half the heads
    with torch.no_grad():
        for gm in (masked, skipping):
            heads = [head for name, head in gm.named_modules() if name.endswith(".heads")]
            for position, head in enumerate(heads):  # the first decided block uses none, the others every other one
                every_other = [20.0, -20.0] * (head.bias.numel() // 2)
                head.bias.copy_(torch.tensor([-20.0] * head.bias.numel() if position == 0 else every_other))
    x = image_batch(model, batch=2, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(skipping(x), masked(x), atol=1e-10, rtol=0)
    # q, k, v, the output projection, the attention products and the MLP's first layer run on half the heads
    assert fxprune.flops(skipping, x[:1]) < 0.8 * fxprune.flops(masked, x[:1])  # 0.99 with the attention alone


def _set_heads(gm, kind, bias=None, seed=0):
    """Set ``gm``'s decision heads of ``kind`` in block 1 to the constant logit ``bias``, or (None) to random
    weights, so that each image decides differently; the other blocks' decision heads are left as they are."""
    generator = torch.Generator().manual_seed(seed)
    head = gm.get_submodule(f"fxprune.blocks_1.{kind}")
    if bias is None:
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator, dtype=head.weight.dtype))
        head.bias.zero_()
    else:
        head.weight.zero_()
        head.bias.fill_(bias)


def test_a_sub_layer_that_uses_no_head_is_computed_on_one_row_and_added_to_every_used_row():
    model = _model()
    masked, skipping = _masked_and_skipping(model, init_logit=20.0)  # everything used, then block 1 changed
    x = image_batch(model, batch=4, dtype=torch.float64)
    with torch.no_grad():
        for gm in (masked, skipping):  # block 1: no head; sub-layers and rows differ from image to image
            _set_heads(gm, "heads", -20.0)
            _set_heads(gm, "sublayers", seed=1)
            _set_heads(gm, "tokens", seed=2)
        used = _usage(masked, x)
        sublayers, rows = used[f"{SUBLAYERS_KEY}blocks.1"], used[f"{TOKENS_KEY}blocks.1"].sum(1)
        assert (sublayers == 0).any() and (sublayers.sum(0) >= 2).all() and rows.amax() > rows.amin()
        expected = masked(x)
        torch.testing.assert_close(skipping(x), expected, atol=1e-10, rtol=0)
        for i in range(len(x)):
            torch.testing.assert_close(skipping(x[i : i + 1]), expected[i : i + 1], atol=1e-10, rtol=0)
        # what block 1's two sub-layers cost one image: one row through the MLP's second layer (its first and the
        # attention's projections have no channels), beside the row and head decisions a used block makes
        _set_heads(skipping, "sublayers", 20.0)
        both = fxprune.flops(skipping, x[:1])
        _set_heads(skipping, "sublayers", -20.0)
        neither = fxprune.flops(skipping, x[:1])
    dim, hidden, tokens = model.embed_dim, model.blocks[1].mlp.fc2.in_features, model.patch_embed.num_patches + 1
    heads = model.blocks[1].attn.num_heads
    decisions = (tokens - 1) * dim + heads * dim + 5 * tokens * dim  # the row and head decision heads, the first norm
    assert 0 < both - neither <= decisions + 5 * dim + hidden * dim  # the second norm and the MLP's second layer


def _counting(calls, name, forward):
    """``forward``, counting its calls in ``calls[name]``."""
    def counted(*args):
        calls[name] += 1
        return forward(*args)

    return counted


def test_where_no_image_uses_a_head_a_one_row_sub_layer_runs_a_graph_of_its_biases_once_for_its_parameters():
    model = _model()
    masked, skipping = _masked_and_skipping(model, init_logit=20.0)  # everything used, then block 1 changed
    x = image_batch(model, batch=4, dtype=torch.float64)
    with torch.no_grad():
        for gm in (masked, skipping):  # block 1: no image uses a head; its rows differ from image to image
            _set_heads(gm, "heads", -20.0)
            _set_heads(gm, "tokens", seed=2)
    parts = dict(skipping.fxprune_graphs.named_children())
    for name in ("skipping_blocks_1_attention", "skipping_blocks_1_mlp"):  # no head product, no attention call
        targets = {node.target for node in parts[f"{name}_without_heads"].graph.nodes}
        assert not targets & {project_heads, project_from_heads, project_head_channels, F.scaled_dot_product_attention}
    calls = collections.Counter()
    for name, part in parts.items():
        part.forward = _counting(calls, name, part.forward)
    with torch.no_grad():
        expected = masked(x)
        torch.testing.assert_close(skipping(x), expected, atol=1e-10, rtol=0)
        for i in range(len(x)):
            torch.testing.assert_close(skipping(x[i : i + 1]), expected[i : i + 1], atol=1e-10, rtol=0)
    assert calls["skipping_blocks_1_attention_without_heads"] == calls["skipping_blocks_1_mlp_without_heads"] == 1
    assert calls["skipping_blocks_1_attention"] == calls["skipping_blocks_1_mlp"] == 0
    assert calls["skipping_blocks_2_attention"] == 5 and calls["skipping_blocks_2_attention_without_heads"] == 0
    mlp, attention = model.blocks[1].mlp, model.blocks[1].attn  # shared with both graphs
    shift = torch.linspace(-1.0, 1.0, model.embed_dim, dtype=torch.float64)  # not the same for every channel
    changes = [  # in place (a new version) in a module, new memory, in place in a parameter the graph reads
        ("mlp", lambda: mlp.fc2.bias.add_(shift)),
        ("attention", lambda: setattr(attention.proj.bias, "data", attention.proj.bias + shift)),
        ("mlp", lambda: mlp.fc1.bias.mul_(2.0))]
    for changed, change in changes:
        calls.clear()
        with torch.no_grad():
            change()
            torch.testing.assert_close(skipping(x), masked(x), atol=1e-10, rtol=0)
            skipping(x)
        kept = {name: calls[f"skipping_blocks_1_{name}_without_heads"] for name in ("attention", "mlp")}
        assert kept == {name: int(name == changed) for name in kept}  # the changed one computed again, once
    calls.clear()
    skipping(x)  # autograd on: computed at each call
    skipping(x)
    assert calls["skipping_blocks_1_mlp_without_heads"] == 2


def test_a_row_from_biases_of_parameters_made_in_inference_mode_is_computed_at_each_call():
    with torch.inference_mode():  # such tensors keep no version: a change in place could not be seen
        model = timm_vit("vit_tiny_patch16_224", depth=3)
        skipping = fxprune.transform(model, AdaViT(0.5, init_logit=20.0))
        _set_heads(skipping, "heads", -20.0)
        x = image_batch(model, batch=2)
        before = skipping(x)
        model.blocks[1].mlp.fc2.bias.add_(torch.linspace(-1.0, 1.0, model.embed_dim))
        after = skipping(x)
        model.blocks[1].mlp.fc2.bias.sub_(torch.linspace(-1.0, 1.0, model.embed_dim))
        torch.testing.assert_close(skipping(x), before, atol=1e-5, rtol=0)
    assert (after - before).abs().amax() > 1e-2


def test_fxprune_train_fine_tunes_adavit_and_reports_its_usage(capsys, tmp_path):
    from fxprune.tools.cli import main
    from fxprune.tools.models import digits_vit

    weights = tmp_path / "adavit.pt"
    code = main(["train", "--policy", "adavit:usage=0.5,init=3", "--steps", "2", "--batch", "8", "--train-images",
                 "32", "--images", "16", "--out", str(tmp_path / "ckpt.pt"), "--weights-out", str(weights),
                 "--backbone-lr-scale", "0.1"])
    printed = capsys.readouterr().out
    assert code == 0 and "rows used per image" in printed and "heads, attention" in printed
    loaded = fxprune.transform(digits_vit(), AdaViT(0.5, weights=str(weights)))
    assert "untrained" not in str(loaded.fxprune_plan)
    expected = [n for n in loaded.fxprune_plan.notes if "expected usage, measured after training: block" in n]
    assert len(expected) == 6 and "rows used per image" in expected[1]  # one per block, as printed


def test_shipped_digits_states_load_for_their_usages_and_skip_part_of_the_model():
    from fxprune.tools.bench import per_image_macs
    from fxprune.tools.datasets import DigitScenes
    from fxprune.tools.models import digits_vit

    model, data = digits_vit(), DigitScenes("test", 48, seed=1)
    images, labels = torch.stack([data[i][0] for i in range(48)]), torch.tensor([data[i][1] for i in range(48)])
    dense = per_image_macs(model, images[:1])
    for usage, most in ((0.7, 0.95), (0.5, 0.5)):  # their MACs per image in BENCHMARKS.md: about 81% and 38%
        gm = fxprune.transform(model, fxprune.parse_policy(f"adavit:usage={usage},weights=digits"))
        notes = gm.fxprune_plan.notes
        assert any("backbone weights loaded" in note for note in notes) and not any("untrained" in n for n in notes)
        assert any("expected usage, measured after training: block 5" in note for note in notes)
        with torch.no_grad():
            accuracy = (gm(images).argmax(-1) == labels).float().mean()
        assert per_image_macs(gm, images[:16]) < most * dense and accuracy > 0.5  # chance: 0.1
    with pytest.raises(fxprune.PolicyError, match="ships for usages 0.7, 0.5"):
        fxprune.transform(model, AdaViT(0.35, weights="digits"))
    with pytest.raises(fxprune.PolicyError, match="ships for usages 0.7, 0.5"):
        fxprune.transform(model, AdaViT(0.5, decides=("heads",), weights="digits"))
    with pytest.raises(fxprune.PolicyError, match=r"\(for adavit usage 0\.5\) do not fit"):  # not "(untrained)"
        fxprune.transform(timm_vit("deit_small_patch16_224", depth=4), AdaViT(0.5, weights="digits"))


def test_set_usage_gives_a_random_usage_of_each_kind():
    from fxprune.methods.adavit import set_usage
    from fxprune.tools.show import usage

    model = timm_vit("deit_small_patch16_224", depth=4)
    gm = fxprune.transform(model, AdaViT(0.5))
    x = image_batch(model, batch=6)
    set_usage(gm, x, 0.5)
    blocks = usage(gm, x)
    heads = torch.cat([b.heads for b in blocks if b.heads is not None], dim=1)
    sublayers = torch.cat([b.sublayers for b in blocks if b.sublayers is not None], dim=1)
    assert heads.mean() == 0.5 and sublayers.mean() == 0.5  # the same for every image
    assert (heads == heads[:1]).all() and (sublayers == sublayers[:1]).all()
    for block in blocks:  # rows: about half of the patch rows, different rows per image
        patches = block.rows[:, 1:]
        assert abs(patches.mean().item() - 0.5) < 0.05 and not (patches == patches[:1]).all()
    set_usage(gm, x, 0.5, parts=("heads",))
    assert all(b.rows.mean() == 1 and (b.sublayers is None or b.sublayers.mean() == 1) for b in usage(gm, x))


def test_set_usage_cuts_the_token_decisions_midway_between_the_rows_it_separates():
    """Each row's token logit as far from the threshold as the rows allow: another CPU's rounding (a hand-written
    reference beside the graph) does not flip a decision."""
    model = timm_vit("deit_small_patch16_224", depth=3)
    gm = fxprune.transform(model, AdaViT(0.5))
    x = image_batch(model, batch=6)
    set_usage(gm, x, {"tokens": 0.75})
    logits = []
    hooks = [head.register_forward_hook(lambda module, args, out: logits.append(out.flatten()))
             for name, head in gm.named_modules() if name.endswith(".tokens")]
    with torch.no_grad(), fxprune.collect():
        gm(x)
    for hook in hooks:
        hook.remove()
    assert len(logits) == 3
    for block in logits:
        margin = block - math.log(TOKEN_THRESHOLD / (1 - TOKEN_THRESHOLD))
        assert (margin > 0).sum() == round(0.75 * block.numel())
        torch.testing.assert_close(margin[margin > 0].min(), -margin[margin <= 0].max())


def test_a_block_whose_sub_layers_no_image_uses_runs_nothing_else_unless_collected():
    model = timm_vit("deit_small_patch16_224", depth=4).double()
    x = image_batch(model, batch=3, dtype=torch.float64)
    masked = fxprune.transform(model, AdaViT(0.5, init_logit=0.0, skip=False))
    set_usage(masked, x, {"sublayers": 0.34, "heads": 0.5, "tokens": 0.7})  # 2 of the 6 sub-layers
    skipping = fxprune.transform(model, AdaViT(0.5, init_logit=0.0))
    skipping.load_state_dict(masked.state_dict())
    decided = _usage(masked, x)
    unused = [key[len(SUBLAYERS_KEY):] for key, value in decided.items()
              if key.startswith(SUBLAYERS_KEY) and not value.any()]
    assert unused and len(unused) < 3  # some blocks use neither sub-layer, others do
    called, run = [], []
    for name, head in skipping.named_modules():
        if name.endswith((".heads", ".tokens")):
            head.register_forward_hook(lambda module, args, out, name=name: called.append(name))

    def recorded(forward, block):
        def record(*inputs):
            run.append(block)
            return forward(*inputs)
        return record

    for name, part in skipping.fxprune_graphs.named_children():  # the rest of each block deciding its sub-layers
        if name.startswith("block_"):  # called by its forward, not as a module: recorded on the instance
            part.forward = recorded(part.forward, name[len("block_"):].replace("blocks_", "blocks."))
    with torch.no_grad():
        for batch in (x, x[:1]):
            called.clear()
            run.clear()
            torch.testing.assert_close(skipping(batch), masked(batch), atol=1e-10, rtol=0)
            deciding = {name.split(".")[1].replace("blocks_", "blocks.") for name in called}
            assert deciding == {f"blocks.{i}" for i in range(4)} - set(unused)  # block 0 decides rows only
            assert set(run) == {f"blocks.{i}" for i in range(1, 4)} - set(unused)  # layouts, row sums: not run
    collected = _usage(skipping, x)  # a collect() context: every block decides, as the masked graph
    assert collected.keys() == decided.keys()
    for key, value in collected.items():
        torch.testing.assert_close(value, decided[key], atol=0, rtol=0)


def test_the_skipping_graph_runs_under_cpu_autocast_as_in_full_precision():
    torch.manual_seed(0)  # a sub-layer without heads and sub-layers on some images (before: dtype errors)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4,
                              num_classes=5).eval()
    skipping = fxprune.transform(model, AdaViT(0.5))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for images in (x[:1], x):
        with torch.no_grad():
            full = skipping(images)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = skipping(images)
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), full, atol=0.05, rtol=0)


def test_an_empty_batch_runs_through_blocks_whose_sub_layers_no_image_uses():
    model = timm_vit("deit_small_patch16_224")
    skipping = fxprune.transform(model, AdaViT(0.5))  # every block but the first decides its sub-layers
    empty = image_batch(model)[:0]  # no image uses a sub-layer: before, the layout read rows never decided
    with torch.no_grad():
        assert logits(skipping(empty)).shape == model(empty).shape


def test_a_layer_whose_weight_a_hook_computes_is_called_as_a_module_and_skipping_still_equals_masking():
    from torch.nn.utils import prune

    model = timm_vit("deit_small_patch16_224", depth=3)
    for block in model.blocks:  # its weight: a plain attribute, weight_orig · weight_mask, set by a hook per call
        prune.l1_unstructured(block.attn.qkv, "weight", amount=0.5)
    skipping = fxprune.transform(model, AdaViT(0.5))  # before: its products read the weight the capture left fake
    masked = fxprune.transform(model, AdaViT(0.5, skip=False))
    masked.load_state_dict(skipping.state_dict())
    x = image_batch(model, batch=3)
    with torch.no_grad():
        for _ in range(2):  # and again once the weight the hook computes has changed, as in training
            out = skipping(x)
            torch.testing.assert_close(out, masked(x), atol=1e-5, rtol=0)
            torch.testing.assert_close(out[1:], skipping(x[1:]), atol=1e-5, rtol=0)
            model.blocks[1].attn.qkv.weight_orig.mul_(2.0)
