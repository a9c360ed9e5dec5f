"""A dense output (every token) gets the original token layout back after the last block: each original token takes
the row that holds it (its own, or the one it was merged into), or, once dropped, its state where its block dropped it
(the block's input for a selection made before the attention, after the attention for EViT's). Budget: about 20 s."""

import pytest
import timm
import torch
from vits import assert_compiles_once, lookout

import fxprune
from fxprune.passes.restore import restore_point
from fxprune.tools.show import token_sources

POLICIES = {
    "topk": fxprune.TopK(0.5, (1, 2)),
    "evit": fxprune.EViT(0.5, (1, 2)),
    "tome": fxprune.ToMe(3, (1, 2)),
    "ats": fxprune.ATS(0.5, (1, 2)),
    "dynamicvit": fxprune.DynamicViT(0.5, (1, 2)),
}
IDENTITIES = [fxprune.TopK(1.0, (1, 2)), fxprune.EViT(1.0, (1, 2)), fxprune.ToMe(0, (1, 2)), fxprune.Stride(1, (1,))]


def _backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4,
                              num_classes=0, global_pool="")  # its output: every token, [B, 17, 384]
    return model.eval().double()


def _images(count: int = 3) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _reduced_rows(gm: torch.fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    """The stream's rows where the layout is put back, before it is (the final norm applied to them)."""
    restored = next(n for n in gm.graph.nodes if n.name.endswith("restored_layout"))
    captured = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is restored.args[1]:
                captured["rows"] = out
            return out

    with torch.no_grad():
        Capture(gm).run(x)
    return captured["rows"]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_each_token_takes_the_row_that_holds_it_and_each_image_gets_what_it_gets_alone(name):
    model = _backbone()
    gm = fxprune.transform(model, POLICIES[name])
    assert any("the original token layout is put back" in note for note in gm.fxprune_plan.notes)
    x = _images()
    with torch.no_grad():
        out, dense = gm(x), model(x)
        alone = torch.cat([gm(x[i:i + 1]) for i in range(x.shape[0])])
    assert out.shape == dense.shape == (3, 17, 384)
    torch.testing.assert_close(out, alone, atol=1e-10, rtol=0)
    rows = model.norm(_reduced_rows(gm, x))
    sources = token_sources(gm, x)[-1].sources  # [B, N', 17]: what each remaining row is made of
    if name == "evit":  # a fused token (a row of several sources) sums dropped tokens but holds none of them
        sources = sources * ((sources > 0).sum(-1, keepdim=True) == 1)
    holder = sources.argmax(dim=1)
    held = sources.amax(dim=1) > 0
    for b in range(x.shape[0]):
        for j in range(17):
            if held[b, j]:
                torch.testing.assert_close(out[b, j], rows[b, holder[b, j]], atol=1e-10, rtol=0)
    assert held.all() if name == "tome" else not held.all()  # merged: every token is held


@pytest.mark.parametrize("policy, after_attention", [(fxprune.TopK(0.5, (1,)), False), (fxprune.EViT(0.5, (1,)), True)],
                         ids=["topk", "evit"])
def test_a_dropped_token_keeps_its_state_where_its_block_dropped_it(policy, after_attention):
    model = _backbone()
    gm = fxprune.transform(model, policy)
    x = _images(1)
    with torch.no_grad():
        entering = model.blocks[0](model._pos_embed(model.patch_embed(x)))  # the stream entering block 1
        if after_attention:  # EViT selects after the block's attention (its fused token needs every row's)
            block = model.blocks[1]
            entering = entering + block.drop_path1(block.ls1(block.attn(block.norm1(entering))))
        out = gm(x)
    kept = token_sources(gm, x)[-1].sources[0, :9]  # the prefix and the 8 kept rows (EViT's fused row after them)
    dropped = (kept.amax(dim=0) == 0).nonzero().flatten()
    assert len(dropped) == 8
    torch.testing.assert_close(out[0, dropped], model.norm(entering)[0, dropped], atol=1e-10, rtol=0)


def _hf_backbone() -> torch.nn.Module:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=128)
    return ViTModel(config, add_pooling_layer=False).eval().double()  # last_hidden_state: every token


@pytest.mark.parametrize("build", [_backbone, lambda: lookout("all").double(), _hf_backbone],
                         ids=["timm", "hand-written", "hugging-face"])
def test_keeping_every_token_reproduces_a_dense_output(build):
    model = build()
    x = _images()
    with torch.no_grad():
        expected = model(x)
    for policy in IDENTITIES:
        gm = fxprune.transform(model, policy)
        with torch.no_grad():
            got = gm(x)
        for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_a_model_that_reads_its_class_token_is_not_restored():
    gm = fxprune.transform(timm.create_model("deit_small_patch16_224", img_size=32, patch_size=8, depth=4),
                           fxprune.TopK(0.5, (1,)))
    assert not any(n.name.endswith("restored_layout") for n in gm.graph.nodes)


def test_the_layout_is_put_back_before_the_final_norm_and_compiles_as_one_graph():
    model = _backbone().float()
    assert restore_point(fxprune.analyse(model)).name != "norm"  # the last block's output, which the norm reads
    assert_compiles_once(fxprune.transform(model, fxprune.ATS(0.5, (1, 2))), model)
    assert_compiles_once(fxprune.transform(model, fxprune.ATS(0.5, (1, 2)), restore=False), model)  # same shapes


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_without_restoring_the_reduced_rows_come_with_each_rows_original_position_on_the_static_rows(name):
    model = _backbone()
    x = _images()
    torch.manual_seed(0)  # DynamicViT's untrained predictors: the same in both transforms
    reduced = fxprune.transform(model, POLICIES[name], restore=False)
    assert any("with restore=False it returns the reduced rows" in note for note in reduced.fxprune_plan.notes)
    torch.manual_seed(0)
    restored = fxprune.transform(model, POLICIES[name])
    with torch.no_grad():
        rows, positions = reduced(x)
        expected = model.norm(_reduced_rows(restored, x))  # eager: the batch's largest count of rows
    width, count = reduced.fxprune_plan.rows[-1].tokens_out, expected.shape[1]
    assert rows.shape == (x.shape[0], width, expected.shape[2]) and positions.shape == (x.shape[0], width)
    real = positions >= 0
    torch.testing.assert_close(rows[:, :count], expected.where(real[:, :count, None], 0), atol=1e-10, rtol=0)
    assert (rows[:, count:] == 0).all() and (positions[:, count:] == -1).all()  # the static layout's padding
    sources = token_sources(reduced, x)[-1].sources  # [B, N_eager, 17]
    assert (sources.gather(2, positions[:, :count].clamp(min=0).unsqueeze(-1))[..., 0][real[:, :count]] > 0).all()
    assert (sources.abs().sum(-1)[~real[:, :count]] == 0).all()  # −1: padding, which holds nothing
    with torch.no_grad():
        for i in range(x.shape[0]):  # the same shape alone as in a batch
            alone_rows, alone_positions = reduced(x[i:i + 1])
            torch.testing.assert_close(rows[i:i + 1], alone_rows, atol=1e-10, rtol=0)
            assert torch.equal(positions[i:i + 1], alone_positions)


def test_without_restoring_a_hugging_face_backbone_returns_its_output_beside_the_positions():
    model, x = _hf_backbone(), _images()
    reduced = fxprune.transform(model, fxprune.ATS(0.5, (1, 2)), restore=False)
    with torch.no_grad():
        output, positions = reduced(x)
        for i in range(x.shape[0]):  # its own output type, the static rows, each image as alone
            alone, alone_positions = reduced(x[i:i + 1])
            torch.testing.assert_close(output["last_hidden_state"][i:i + 1], alone["last_hidden_state"],
                                       atol=1e-10, rtol=0)
            assert torch.equal(positions[i:i + 1], alone_positions)
    assert output["last_hidden_state"].shape[:2] == positions.shape == (3, reduced.fxprune_plan.rows[-1].tokens_out)


def test_without_restoring_keeping_every_token_returns_the_model_output_and_every_position():
    model = _backbone()
    x = _images()
    rows, positions = fxprune.transform(model, fxprune.TopK(1.0, (1, 2)), restore=False)(x)
    with torch.no_grad():
        torch.testing.assert_close(rows, model(x), atol=1e-10, rtol=0)
    assert torch.equal(positions, torch.arange(17).expand(3, -1))


def test_the_macs_count_the_restoration():
    model = _backbone()
    x = _images(1)
    for policy in (fxprune.ToMe(3, (1, 2)), fxprune.EViT(0.5, (1, 2))):
        restored = fxprune.flops(fxprune.transform(model, policy), x)
        reduced = fxprune.flops(fxprune.transform(model, policy, restore=False), x)
        assert restored > reduced


def test_a_torchvision_feature_extractor_gets_the_layout_back():
    from torchvision.models import VisionTransformer
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64)
    backbone = create_feature_extractor(vit.eval(), {"encoder": "tokens"}).double()  # {"tokens": [B, 17, 32]}
    x = _images()
    example = (x[:2],)  # a feature extractor declares no input size
    with torch.no_grad():
        expected = backbone(x)["tokens"]
        same = fxprune.transform(backbone, fxprune.TopK(1.0, (1, 2)), example)(x)["tokens"]
        reduced = fxprune.transform(backbone, fxprune.TopK(0.5, (1, 2)), example)(x)["tokens"]
    torch.testing.assert_close(same, expected, atol=1e-10, rtol=0)
    assert reduced.shape == expected.shape


def test_every_token_returned_beside_an_attention_pool_gets_the_layout_back_and_the_pool_reads_it():
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    torch.manual_seed(0)  # last_hidden_state (every token) and pooler_output (an attention pool over them)
    model = Aimv2VisionModel(Aimv2VisionConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=3,
                                               num_attention_heads=2, intermediate_size=96)).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(x)
        identity = fxprune.transform(model, fxprune.DynamicViT(1.0, (1, 2)))(x)  # keep 1 sorts the rows
        reduced = fxprune.transform(model, fxprune.Compose([fxprune.ATS(0.5, (1,)), fxprune.ToMe(3, (2,))]))
        together = reduced(x)
        for key in ("last_hidden_state", "pooler_output"):
            torch.testing.assert_close(identity[key], dense[key], atol=1e-5, rtol=0)
            assert together[key].shape == dense[key].shape
            alone = torch.cat([reduced(x[i : i + 1])[key] for i in range(3)])
            torch.testing.assert_close(together[key], alone, atol=1e-5, rtol=0)


def _feature_maps() -> torch.nn.Module:
    torch.manual_seed(0)  # timm's features_only: the patch tokens after each of its 4 blocks, as [B, C, 4, 4] maps
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4,
                              features_only=True, out_indices=(0, 1, 2, 3))
    return model.eval().double()


def _maps_with_reductions(net: torch.nn.Module, image: torch.Tensor, kept: dict[int, list[int]],
                          before_block: bool) -> list[torch.Tensor]:
    """Eager reference for one image ``[1, 3, H, W]``: each block's patch tokens ``[1, N - 1, C]`` in the original
    layout, block ``i`` of ``kept`` keeping the original tokens ``kept[i]``: the kept ones run on (queries of the
    reducing block attending to every token it receives; ``before_block``: only the kept ones enter it), a dropped
    one stays as it entered the block that dropped it."""
    vit = net.model
    canvas = vit.norm_pre(vit._pos_embed(vit.patch_embed(image)))
    active = list(range(canvas.shape[1]))
    maps = []
    for i, block in enumerate(vit.blocks):
        tokens = canvas[:, active]
        if i in kept:
            rows = [active.index(token) for token in kept[i]]
            if before_block:
                tokens = block(tokens[:, rows])
            else:
                tokens = (tokens + block.ls1(block.attn(block.norm1(tokens))))[:, rows]
                tokens = tokens + block.ls2(block.mlp(block.norm2(tokens)))
            active = kept[i]
        else:
            tokens = block(tokens)
        canvas = canvas.index_copy(1, torch.tensor(active), tokens)
        maps.append(canvas[:, 1:])
    return maps


@pytest.mark.parametrize("policy, before_block", [(fxprune.TopK(0.5, (1, 2)), False),
                                                   (fxprune.DynamicViT(0.5, (1, 2)), True)], ids=["topk", "dynamicvit"])
def test_every_block_output_read_apart_gets_the_layout_its_reductions_leave_and_each_image_what_it_gets_alone(
        policy, before_block):
    net = _feature_maps()
    gm = fxprune.transform(net, policy)
    assert any("reads the tokens after blocks 0, 1, 2 apart from the stream" in note for note in gm.fxprune_plan.notes)
    x = _images()
    with torch.no_grad():
        maps = gm(x)
        alone = [gm(x[i:i + 1]) for i in range(x.shape[0])]
    steps = token_sources(gm, x)
    for b in range(x.shape[0]):
        kept = {step.block: sorted(step.sources[b].argmax(-1)[step.sources[b].sum(-1) > 0].tolist()) for step in steps}
        assert [len(tokens) for tokens in kept.values()] == [9, 5]  # the class token and 8, then 4 patches
        with torch.no_grad():
            expected = _maps_with_reductions(net, x[b:b + 1], kept, before_block)
        for got, one, want in zip(maps, alone[b], expected):
            torch.testing.assert_close(got[b:b + 1].flatten(2).transpose(1, 2), want, atol=1e-10, rtol=0)
            torch.testing.assert_close(got[b:b + 1], one, atol=1e-10, rtol=0)


def test_keeping_every_token_reproduces_every_feature_map_and_a_compiled_padded_batch_its_own():
    net = _feature_maps()
    x = _images()
    with torch.no_grad():
        expected = net(x)
        for policy in IDENTITIES:
            for got, want in zip(fxprune.transform(net, policy)(x), expected):
                torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert_compiles_once(fxprune.transform(net.float(), fxprune.ATS(0.5, (1, 2))), net)


def test_without_restoring_reads_of_intermediate_blocks_are_refused():
    with pytest.raises(fxprune.PolicyError, match=r"reads the tokens after blocks 0, 1, 2 apart from the stream "
                       r"\(at getitem_\d+, getitem_\d+, getitem_\d+\).*leave restore=True"):
        fxprune.transform(_feature_maps(), fxprune.TopK(0.5, (1,)), restore=False)


def test_every_hidden_state_of_a_hugging_face_backbone_gets_the_layout_and_those_before_a_reduction_are_as_dense():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)  # hidden_states: the embeddings' tokens and each block's, beside last_hidden_state
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=128, output_hidden_states=True)
    model = ViTModel(config, add_pooling_layer=False).eval().double()
    x = _images()
    reduced = fxprune.transform(model, fxprune.ToMe(3, (1, 2)))  # before: refused, "the token stream leaves"
    with torch.no_grad():
        dense, together = model(x), reduced(x)
        alone = [reduced(x[i:i + 1]) for i in range(x.shape[0])]
        same = fxprune.transform(model, fxprune.ToMe(0, (1, 2)))(x)
    for k, hidden in enumerate(together.hidden_states):
        assert hidden.shape == dense.hidden_states[k].shape == (3, 17, 64)
        torch.testing.assert_close(same.hidden_states[k], dense.hidden_states[k], atol=1e-10, rtol=0)
        for i in range(x.shape[0]):
            torch.testing.assert_close(hidden[i:i + 1], alone[i].hidden_states[k], atol=1e-10, rtol=0)
    for k in (0, 1):  # the embeddings' and block 0's: before block 1's merge
        torch.testing.assert_close(together.hidden_states[k], dense.hidden_states[k], atol=1e-10, rtol=0)
    assert not torch.allclose(together.hidden_states[2], dense.hidden_states[2], atol=1e-3)


def test_blocks_after_the_last_one_the_output_reads_are_dead_code_and_the_layout_comes_back_before_them():
    from transformers import Dinov2Backbone, Dinov2Config

    torch.manual_seed(0)  # returns the tokens after block 1 (of 4): blocks 2 and 3 run, and nothing reads them
    model = Dinov2Backbone(Dinov2Config(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=4,
                                        num_attention_heads=3, intermediate_size=96, out_indices=[2])).eval().double()
    program = fxprune.analyse(model)
    assert len(program.blocks) == 2
    assert sum("the output reads nothing it computes" in u for u in program.unrecognised) == 2
    x = _images()
    reduced = fxprune.transform(model, fxprune.TopK(0.5, (1,)))  # before: an index out of range when run
    same = fxprune.transform(model, fxprune.TopK(1.0, (1,)))
    with torch.no_grad():
        together = reduced(x).feature_maps[0]
        alone = torch.cat([reduced(x[i:i + 1]).feature_maps[0] for i in range(x.shape[0])])
        torch.testing.assert_close(same(x).feature_maps[0], model(x).feature_maps[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(together, alone, atol=1e-10, rtol=0)
    assert together.shape == (3, 48, 4, 4)
    plan = same.fxprune_plan  # the plan counts the code that runs: the model's own runs blocks 2 and 3 too
    assert plan.macs_before < fxprune.flops(model, x[:1]) and plan.macs_after == fxprune.flops(same, x[:1])


def test_a_mean_pool_over_the_restored_layout_takes_a_padded_batch():
    from transformers import BeitConfig, BeitModel

    torch.manual_seed(0)  # pooler_output: a mean over the final patch rows, beside last_hidden_state and hidden_states
    config = BeitConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=4, num_attention_heads=3,
                        intermediate_size=96, output_hidden_states=True)
    model = BeitModel(config).eval().double()
    x = _images()
    reduced = fxprune.transform(model, fxprune.ATS(0.5, (1, 2)))  # before: refused, "pools over all tokens"
    with torch.no_grad():
        together = reduced(x)
        for i in range(x.shape[0]):  # padding rows hold no token of the restored layout that the mean reads
            alone = reduced(x[i:i + 1])
            for key in ("pooler_output", "last_hidden_state"):
                torch.testing.assert_close(together[key][i:i + 1], alone[key], atol=1e-10, rtol=0)


def test_a_parallel_blocks_output_read_apart_is_read_as_computed_and_one_that_is_the_final_tokens_is_refused():
    torch.manual_seed(0)  # ViT-22B's parallel blocks: each block's output is where a reduction after it goes
    net = timm.create_model("vit_base_patch16_xp_224", pretrained=False, img_size=40, patch_size=8, depth=3,
                            embed_dim=64, num_heads=2, features_only=True, out_indices=(0, 1, 2)).eval().double()
    gm = fxprune.transform(net, fxprune.ToMe(4, (0, 1)))
    assert any("reads the tokens after blocks 0, 1 apart" in note for note in gm.fxprune_plan.notes)
    x = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        maps, expected = gm(x), net(x)
        alone = [gm(x[i:i + 1]) for i in range(x.shape[0])]
    torch.testing.assert_close(maps[0], expected[0], atol=1e-10, rtol=0)  # before: merged rows restored, not these
    assert (maps[1] - expected[1]).abs().max() > 1e-2  # block 1 ran on the tokens block 0's merges left
    for b, one in enumerate(alone):
        for got, own in zip(maps, one):
            torch.testing.assert_close(got[b:b + 1], own, atol=1e-10, rtol=0)
    with pytest.raises(fxprune.UnsupportedModelError, match=r"block 2 \(model.blocks.2\) is a parallel block whose "
                       r"output is the final tokens.*save nothing. Choose earlier blocks"):
        fxprune.transform(net, fxprune.EViT(0.5, (2,)))
