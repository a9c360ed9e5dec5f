import copy

import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from vits import (
    ALL_MODELS,
    assert_same_outputs,
    hf_vit,
    image_batch,
    logits,
    saved_and_loaded,
    timm_vit,
    torchvision_vit,
    zeros_bias_vit,
)

import fxprune
from fxprune.capture import default_example_inputs, reusing_captures, tracer
from fxprune.capture.asserts import check_input
from fxprune.errors import TraceError


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_traced_graph_reproduces_every_model_at_another_batch_size(name):
    model = ALL_MODELS[name]()
    gm = fxprune.trace(model)
    x = image_batch(model, batch=3)  # captured at batch 2
    torch.testing.assert_close(logits(gm(x)), logits(model(x)), atol=1e-5, rtol=0)


def test_full_size_torchvision_vit_b_16_is_traced_with_attention_decomposed():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=64).eval()
    gm = fxprune.trace(model)
    modules = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert not any(isinstance(m, nn.MultiheadAttention) for m in modules)
    sdpa = [n for n in gm.graph.nodes if n.target is torch._C._nn.scaled_dot_product_attention]
    assert len(sdpa) == 12
    assert len(gm.meta["fxprune_trace"].decomposed) == 12
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=0)


class _CalledSelfAttention(nn.Module):
    """Pre-norm self-attention with ``nn.MultiheadAttention``, called with its arguments by position (masks None,
    need_weights False) or by name."""

    def __init__(self, by_name: bool):
        super().__init__()
        self.by_name, self.norm = by_name, nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        y = self.norm(x)
        out = self.attn(query=y, key=y, value=y, need_weights=False) if self.by_name else \
            self.attn(y, y, y, None, False, None)
        return x + out[0]


@pytest.mark.parametrize("by_name", [False, True], ids=["by-position", "by-name"])
def test_multihead_attention_called_with_its_arguments_by_position_or_name_is_decomposed(by_name):
    model = nn.Sequential(_CalledSelfAttention(by_name), _CalledSelfAttention(by_name)).eval()
    x = torch.randn(2, 5, 16)
    gm = fxprune.trace(model, (x,))  # before: left whole "called with a mask", or an IndexError
    assert gm.meta["fxprune_trace"].decomposed == ["0.attn", "1.attn"]
    y = torch.randn(3, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(gm(y), model(y), atol=1e-6, rtol=0)


def test_hugging_face_output_type_is_kept():
    model = hf_vit()
    out = fxprune.trace(model)(image_batch(model))
    assert type(out).__name__ == "ImageClassifierOutput"
    assert out.logits.shape == (3, 10)


def test_arguments_given_by_name_are_the_graphs_inputs_and_the_others_are_fixed_for_the_capture():
    model = hf_vit()
    x, labels = image_batch(model), torch.tensor([1, 7, 3])
    arguments = {"pixel_values": x, "labels": labels, "output_hidden_states": True}
    expected = model(**arguments)
    kept = fxprune.transform(model, fxprune.EViT(keep_rate=1.0, layers=(1, 2)), example_inputs=arguments)
    assert [node.target for node in kept.graph.find_nodes(op="placeholder")] == ["pixel_values", "labels"]
    for out in (kept(x, labels), kept(labels=labels, pixel_values=x)):
        torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=0)
        assert len(out.hidden_states) == len(expected.hidden_states)
        torch.testing.assert_close(out.hidden_states[-1], expected.hidden_states[-1], atol=1e-5, rtol=0)
    reduced = fxprune.transform(model, fxprune.EViT(keep_rate=0.5, layers=(1, 2)), example_inputs=arguments)
    out = reduced(pixel_values=x, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert model.classifier.weight.grad is not None
    assert "fixed for the capture: output_hidden_states=True" in str(reduced.meta["fxprune_trace"])
    with reusing_captures():  # other fixed arguments: another capture
        assert fxprune.trace(model, {"pixel_values": x})(x).hidden_states is None
        assert fxprune.trace(model, {"pixel_values": x, "output_hidden_states": True})(x).hidden_states is not None


def test_a_graph_with_an_integer_input_is_captured_again_on_inputs_given_in_any_order_or_made_up():
    model = hf_vit()
    x, labels = image_batch(model), torch.tensor([1, 7, 3])
    captured = fxprune.trace(model, {"pixel_values": x, "labels": labels})
    again = fxprune.trace(captured, {"labels": labels, "pixel_values": x})
    torch.testing.assert_close(again(x, labels).loss, model(x, labels=labels).loss, atol=1e-5, rtol=0)
    made_up = default_example_inputs(captured, batch_size=4)
    assert [(t.shape, t.dtype) for t in made_up] == [(x[:1].expand(4, -1, -1, -1).shape, x.dtype),
                                                     ((4,), torch.long)]
    assert not made_up[1].any()  # a label every classifier has
    with pytest.raises(TraceError, match="takes the inputs pixel_values, labels"):
        fxprune.trace(captured, {"pixel_values": x})


def test_an_argument_the_models_forward_does_not_take_is_refused_naming_it_and_one_it_does_not_read_is_noted():
    model = timm_vit("deit_small_patch16_224", depth=2)
    with pytest.raises(TraceError, match="takes no keyword argument 'labels'"):
        fxprune.trace(model, {"x": image_batch(model), "labels": torch.tensor([1, 2, 3])})
    with pytest.raises(TraceError, match="hold no tensor"):
        fxprune.trace(hf_vit(), {"return_dict": True})
    misspelt = {"pixel_values": image_batch(model), "lables": torch.tensor([1, 2, 3])}  # taken by **kwargs, unread
    assert "the model does not read its input lables: nothing it computes depends on it" in \
        fxprune.plan(hf_vit(), fxprune.EViT(0.5, (1,)), misspelt, fast=True).notes
    with pytest.raises(TraceError, match=r"example_inputs\['x'\] holds tensors in a list"):
        fxprune.trace(model, {"x": [image_batch(model)]})


def test_hooks_of_modules_the_graph_runs_the_code_of_are_noted_in_the_plan():
    model = timm_vit("deit_small_patch16_224", depth=3)
    model.blocks[1].register_forward_hook(lambda module, args, out: None)
    model.blocks[2].attn.qkv.register_forward_pre_hook(lambda module, args: None)  # a leaf: the graph calls it
    notes = fxprune.plan(model, fxprune.EViT(0.5, (1, 2)), fast=True).notes
    assert [note for note in notes if "hooks" in note] == [
        "the hooks of blocks.1 do not run: the graph runs the code of these modules, not the modules (register hooks "
        "on the modules the graph calls, its leaves, or read values from the graph's nodes)"]


def test_einops_calls_are_kept_whole_so_the_graph_takes_any_batch_and_survives_save_and_load():
    einops = pytest.importorskip("einops")
    from fxprune.tools.zoo import ZOO

    model = next(entry for entry in ZOO if "einops" in entry.name).model()
    gm = fxprune.trace(model)  # before: "Tensor type unknown to einops"
    assert {einops.rearrange, einops.repeat} <= {node.target for node in gm.graph.nodes if node.op == "call_function"}
    x = image_batch(model, batch=5)
    with torch.no_grad():
        for captured in (gm, saved_and_loaded(gm)):
            torch.testing.assert_close(captured(x), model(x), atol=1e-5, rtol=0)


def test_shape_conditions_resolved_during_capture_are_recorded_as_guards():
    info = fxprune.trace(hf_vit()).meta["fxprune_trace"]
    assert info.guards, "HF's dtype and sequence-length checks are resolved from example values"
    assert all(isinstance(g.value, bool) for g in info.guards)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, type(model), model.training, set(vars(model))


@pytest.mark.parametrize("factory", [lambda: timm_vit("deit_small_patch16_224"), hf_vit, torchvision_vit])
def test_trace_leaves_the_users_model_untouched(factory):
    model = factory()
    before = _snapshot(model)
    ids = [id(p) for p in model.parameters()]
    fxprune.trace(model)
    after = _snapshot(model)
    assert before[1:] == after[1:]
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert ids == [id(p) for p in model.parameters()]


def test_parameters_are_shared_by_default_and_copied_on_request():
    model = timm_vit("deit_small_patch16_224")
    shared = fxprune.trace(model)
    copied = fxprune.trace(model, copy_weights=True)
    weight = model.blocks[0].attn.qkv.weight
    assert shared.get_parameter("blocks.0.attn.qkv.weight") is weight
    assert copied.get_parameter("blocks.0.attn.qkv.weight") is not weight
    assert torch.equal(copied.get_parameter("blocks.0.attn.qkv.weight"), weight)


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_state_dict_keys_load_into_the_original_and_back(name):
    model = ALL_MODELS[name]()
    gm = fxprune.trace(model)
    assert set(gm.state_dict()) == set(model.state_dict())
    gm.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(gm.state_dict(), strict=True)


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: cannot be traced
            return x * 2
        return x


class _ModelWithUntraceablePart(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.gate = _DataDependent()

    def forward(self, x):
        return self.gate(self.proj(x)) + 1


def test_untraceable_submodule_becomes_a_leaf_and_the_reason_is_recorded():
    model = _ModelWithUntraceablePart()
    x = torch.randn(2, 4)
    gm = fxprune.trace(model, (x,))
    info = gm.meta["fxprune_trace"]
    assert [name for name, _ in info.leaves] == ["gate"]
    assert "data" in info.leaves[0][1]
    torch.testing.assert_close(gm(x), model(x))
    torch.testing.assert_close(gm(-x.abs() - 10), model(-x.abs() - 10))


def _reduces_each_image_alone(model: nn.Module) -> nn.Module:
    """``model`` with EViT at blocks 1 and 2, which gives each image of a batch what it gives it alone, and whose
    identity setting gives the model's outputs; returned."""
    fast = fxprune.transform(model, fxprune.EViT(0.5, (1, 2)))
    x = image_batch(model, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(fast(x)[1:], fast(x[1:]), atol=1e-5, rtol=0)
    assert_same_outputs(fxprune.transform(model, fxprune.EViT(1.0, (1, 2))), model)
    return fast


class _CheckedBlock(nn.Module):
    """A block that checks its input's values before running the block it wraps: its code branches on tensor data."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        if torch.isnan(x).any():
            raise ValueError("NaN in the tokens")
        return self.block(x)


def test_a_block_kept_whole_as_it_branches_on_data_has_example_values_so_the_blocks_after_it_are_found():
    model = timm_vit("vit_tiny_patch16_224")
    model.blocks[1] = _CheckedBlock(model.blocks[1])
    program = fxprune.analyse(model)  # before: blocks.2 and .3 "on queries of unknown shape", and no class token
    assert "kept as a leaf: blocks.1 (TraceError: control flow depends on tensor data" in str(program.trace)
    assert [block.name for block in program.blocks] == ["blocks.0", "blocks.2", "blocks.3"]
    assert program.class_token and program.unrecognised == []
    assert "kept as a leaf during capture: blocks.1" in str(_reduces_each_image_alone(model).fxprune_plan)
    assert "shapes depend" not in str(program.trace)


class _RowsByValue(_CheckedBlock):
    """A checked block that returns only as many rows as its input has positive first channels: output shapes that
    depend on the input's values."""

    def forward(self, x):
        return super().forward(x)[:, : max(int((x[0, :, 0] > 0).sum()), 1)]


def test_a_leaf_whose_output_shapes_depend_on_its_input_values_is_named_in_the_plan():
    model = timm_vit("vit_tiny_patch16_224")
    model.blocks[3] = _RowsByValue(model.blocks[3])
    expected = ("blocks.3, a leaf run on random stand-ins of its inputs, gives outputs whose shapes depend on their "
                "values: the plan and any rewrite after it assume the shapes of that run")
    assert expected in str(fxprune.analyse(model).trace)  # before: its shapes from one run, and no word of it
    assert expected in str(fxprune.plan(model, fxprune.EViT(0.5, (1, 2))))


def test_a_torchscript_block_is_called_whole_and_the_plan_says_attention_inside_it_is_not_seen():
    model = timm_vit("vit_tiny_patch16_224")
    model.blocks[1] = torch.jit.script(model.blocks[1])
    gm = fxprune.trace(model)  # before: a call of its compiled forward on the TorchScript object (blocks.1._c)
    assert "blocks.1" in {node.target for node in gm.graph.find_nodes(op="call_module")}
    assert not any(node.target.startswith("blocks.1.") for node in gm.graph.find_nodes(op="get_attr"))
    fast = fxprune.transform(model, fxprune.EViT(0.5, (1, 2)))
    assert [row.name for row in fast.fxprune_plan.rows] == ["blocks.0", "blocks.2", "blocks.3"]
    assert "blocks.1 (RecursiveScriptModule), called whole: attention inside it is not seen" in str(fast.fxprune_plan)
    assert_same_outputs(fxprune.transform(model, fxprune.EViT(1.0, (1, 2))), model)


@pytest.mark.parametrize("make", [torch.jit.script, lambda model: torch.jit.trace(model, image_batch(model))],
                         ids=["script", "trace"])
def test_a_torchscript_model_is_refused_saying_to_pass_the_module_it_was_made_from(make):
    model = timm_vit("vit_tiny_patch16_224")
    scripted = make(model)  # before: AttributeError, "no signature found", or "cannot tell which input size"
    for example_inputs in (None, image_batch(model)):
        with pytest.raises(TraceError, match=r"TorchScript module .*pass the nn.Module it was made from"):
            fxprune.transform(scripted, fxprune.EViT(0.5, (1,)), example_inputs=example_inputs)


def test_torch_factories_given_traced_sizes_one_by_one_are_traced_and_follow_the_reduced_tokens():
    model = zeros_bias_vit()
    gm = fxprune.trace(model)  # before: each attention a leaf ("zeros() takes 1 positional argument")
    assert gm.meta["fxprune_trace"].leaves == []
    _reduces_each_image_alone(model)


def test_a_model_pruned_with_torch_nn_utils_prune_is_captured_and_its_pruned_weights_follow_their_parameters():
    from torch.nn.utils import prune

    model = timm_vit("vit_tiny_patch16_224")
    for block in model.blocks:  # a plain tensor attribute that autograd computed: it cannot be deep-copied
        prune.l1_unstructured(block.mlp.fc1, "weight", amount=0.5)
    identity = fxprune.transform(model, fxprune.EViT(1.0, (1, 2)))  # before: RuntimeError from copy.deepcopy
    held = [module.weight for name, module in identity.named_modules() if name.endswith("mlp.fc1")]
    assert len(held) == 4 and not any(isinstance(weight, FakeTensor) for weight in held)  # as the hook left them
    assert_same_outputs(identity, model)
    with torch.no_grad():
        model.blocks[2].mlp.fc1.weight_orig.mul_(2.0)  # the hook computes the pruned weight again at each call
    assert_same_outputs(identity, model)
    assert_same_outputs(saved_and_loaded(identity), model)  # before: a fake weight, which cannot be pickled


class _UntraceableRoot(nn.Module):
    def forward(self, x):
        if x.mean() > 0:
            return x
        return -x


def test_untraceable_root_raises_trace_error_naming_the_model():
    with pytest.raises(TraceError, match="_UntraceableRoot"):
        fxprune.trace(_UntraceableRoot(), (torch.randn(2, 3),))


def test_example_inputs_follow_the_declared_image_size():
    assert default_example_inputs(timm_vit("vit_small_patch14_reg4_dinov2"))[0].shape == (2, 3, 56, 56)
    assert default_example_inputs(hf_vit())[0].shape == (2, 3, 32, 32)
    with pytest.raises(TraceError, match="example_inputs"):
        default_example_inputs(torchvision.models.resnet18())


def _vivit() -> nn.Module:
    from transformers import VivitConfig, VivitForVideoClassification

    torch.manual_seed(0)
    return VivitForVideoClassification(VivitConfig(
        image_size=32, num_frames=4, tubelet_size=[2, 8, 8], hidden_size=48, num_hidden_layers=2,
        num_attention_heads=3, intermediate_size=96, num_labels=10)).eval()


def test_a_video_model_that_declares_its_frames_is_captured_on_clips_of_them():
    model = _vivit()
    assert default_example_inputs(model)[0].shape == (2, 4, 3, 32, 32)  # [B, T, C, H, W], as HF's video models
    fast = fxprune.transform(model, fxprune.ToMe(r=4))  # no example_inputs: before, "found no attention"
    clips = torch.randn(3, 4, 3, 32, 32)
    assert fxprune.analyse(model).blocks[0].tokens == 33  # 2 × 4 × 4 tubelets and the class token
    with torch.no_grad():
        assert logits(fast(clips)).shape == logits(model(clips)).shape == (3, 10)


def test_a_timm_feature_wrapper_is_captured_at_the_size_of_the_model_it_wraps():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              features_only=True, out_indices=(0, 1))  # its own pretrained_cfg says 224
    assert default_example_inputs(model)[0].shape == (2, 3, 32, 32)  # before: 224, and no attention read


def test_position_embeddings_interpolated_to_another_size_are_traced_and_their_class_token_found():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)  # declared for 32², run at 48²: interpolate_pos_encoding makes sizes Python numbers
    model = Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                     num_attention_heads=3, intermediate_size=96)).eval()
    x = torch.randn(2, 3, 48, 48)
    program = fxprune.analyse(model, (x,))
    assert program.trace.leaves == [] and program.trace.guards  # before: embeddings kept whole, no prefix token
    assert (program.prefix_tokens, program.tokens) == (1, 37)
    gm = fxprune.transform(model, fxprune.TopK(1.0, (1,)), example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(gm(x).last_hidden_state, model(x).last_hidden_state, atol=1e-5, rtol=0)
        assert gm(torch.randn(3, 3, 48, 48)).last_hidden_state.shape == (3, 37, 48)


def test_traced_module_survives_save_and_load():
    model = hf_vit()
    loaded = saved_and_loaded(fxprune.trace(model))
    assert isinstance(loaded, fx.GraphModule)
    x = image_batch(model)
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_copies_of_captures_and_of_transformed_models_survive_save_and_load():
    model = hf_vit()
    policy = fxprune.TopK(keep_rate=0.5, layers=(1,))
    with reusing_captures():
        fxprune.trace(model)
        copied = fxprune.transform(model, policy)  # from a copy of the capture above
    recaptured = fxprune.transform(fxprune.trace(model), policy)  # a capture given to transform is copied
    learned = fxprune.transform(model, fxprune.DynamicViT(0.7, (1,)))  # its training graph kept beside
    for gm in (copied, recaptured, copy.deepcopy(fxprune.transform(model, policy)), copy.deepcopy(learned)):
        x = image_batch(model)
        with torch.no_grad():
            torch.testing.assert_close(saved_and_loaded(gm)(x).logits, gm(x).logits, atol=0, rtol=0)


def _failing_add() -> None:
    with pytest.raises(RuntimeError, match="broadcast|size"):
        torch.empty(2, 3) + torch.empty(4, 5)


def test_an_op_failing_on_fake_tensors_raises_without_torch_printing_its_traceback(capfd, caplog):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxprune.capture import fake_mode

    with FakeTensorMode():  # torch's own mode logs the failure (the control)
        _failing_add()
    logged = capfd.readouterr().err + caplog.text
    assert "failed while attempting to run meta" in logged
    caplog.clear()
    with fake_mode(), fake_mode():  # fxprune's (nested, as propagation nests them): raised, not logged
        _failing_add()
    assert "failed while attempting to run meta" not in capfd.readouterr().err + caplog.text
    with FakeTensorMode():  # leaving it restores torch's logging
        _failing_add()
    assert "failed while attempting to run meta" in capfd.readouterr().err + caplog.text


def test_a_weight_is_made_fake_once_and_again_when_changed_in_place():
    from fxprune.capture.values import fake_mode, fake_tensor

    layer = nn.Linear(4, 3)
    fake = fake_tensor(layer.weight)
    assert fake_tensor(layer.weight) is fake and fake.fake_mode is fake_mode()
    layer.double()  # replaces the parameter's data, the parameter stays
    with fake_mode():  # as within a capture
        assert fake_tensor(layer.weight).dtype == torch.float64
    layer.requires_grad_(False)
    assert not fake_tensor(layer.weight).requires_grad


def test_a_model_changed_to_float64_after_a_transform_is_transformed_at_its_new_dtype():
    model = timm_vit("vit_tiny_patch16_224")
    fxprune.transform(model, fxprune.EViT(keep_rate=1.0, layers=(1,)))
    x = image_batch(model).double()
    gm = fxprune.transform(model.double(), fxprune.EViT(keep_rate=1.0, layers=(1,)), [x])
    torch.testing.assert_close(gm(x), model(x), atol=1e-12, rtol=0)


def test_a_model_made_and_transformed_within_inference_mode_is_reproduced_by_its_identity_setting():
    with torch.inference_mode():  # its weights and inputs are inference tensors
        model = timm_vit("vit_tiny_patch16_224")
        x = image_batch(model)
        gm = fxprune.transform(model, fxprune.EViT(keep_rate=1.0, layers=(1, 2)), [x])
        assert gm.fxprune_plan.macs_after == fxprune.flops(gm, x)
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=0)


def test_transforms_in_several_threads_at_once_each_reproduce_the_model():
    import threading

    model, transformed = timm_vit("vit_tiny_patch16_224"), {}

    def transform(index: int) -> None:  # before: "Found multiple different tracers", "CURRENT_PATCHER is None"
        transformed[index] = fxprune.transform(model, fxprune.EViT(keep_rate=1.0, layers=(1, 2)))

    threads = [threading.Thread(target=transform, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(transformed) == 3
    for gm in transformed.values():
        assert_same_outputs(gm, model, atol=1e-5)


def test_within_reusing_captures_a_model_is_traced_once_per_input_layout_and_mode(monkeypatch):
    traced, capture = [], tracer._capture

    def counted(model, *args, **kwargs):
        traced.append(model)
        return capture(model, *args, **kwargs)

    monkeypatch.setattr(tracer, "_capture", counted)
    model, other = timm_vit("deit_small_patch16_224", depth=2), timm_vit("deit_small_patch16_224", depth=2)
    x = image_batch(model, batch=3)
    with reusing_captures():
        gms = [fxprune.transform(model, fxprune.TopK(keep_rate=0.5, layers=(1,))), fxprune.analyse(model).gm]
        with reusing_captures():  # an inner block shares the outer one's captures
            gms.append(fxprune.transform(model, fxprune.ToMe(r=4), copy_weights=True))
        assert len(traced) == 1
        fxprune.trace(model, (x,))
        fxprune.trace(model.train())
        fxprune.trace(other)
        fxprune.trace(model.eval(), {"x": x})  # the same input by name: the same capture
        assert traced == [model] * 3 + [other]
    fxprune.trace(model)
    assert len(traced) == 5  # the captures end with the block
    topk, captured, tome = gms
    with torch.no_grad():  # each copy is a model of its own: rewriting one leaves the others as they were
        expected = {"topk": fxprune.transform(model, fxprune.TopK(keep_rate=0.5, layers=(1,)))(x),
                    "tome": fxprune.transform(model, fxprune.ToMe(r=4))(x)}
        torch.testing.assert_close(topk(x), expected["topk"], atol=0, rtol=0)
        torch.testing.assert_close(tome(x), expected["tome"], atol=0, rtol=0)
        torch.testing.assert_close(captured(x), model(x), atol=1e-5, rtol=0)
    assert topk.get_parameter("blocks.0.attn.qkv.weight") is model.blocks[0].attn.qkv.weight  # shared, as always
    assert tome.get_parameter("blocks.0.attn.qkv.weight") is not model.blocks[0].attn.qkv.weight  # copied on request


_TABLES: dict[int, torch.Tensor] = {}  # what _CachedPositions made, by token count


class _CachedPositions(nn.Module):
    """Adds a position table that it makes once per token count and keeps, unless it is being compiled (as Hugging
    Face's cached relative position index of BEiT); ``len()`` of a traced tensor keeps it whole in a capture."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = len(x[0])
        table = torch.linspace(0, 1, count) if torch.compiler.is_compiling() else _TABLES.setdefault(
            count, torch.linspace(0, 1, count))
        return x + table[None, :, None]


def test_a_module_kept_whole_that_caches_tensors_unless_compiled_caches_no_fake_one_in_a_capture():
    model = timm_vit("deit_small_patch16_224")
    model.norm_pre = _CachedPositions()
    gm = fxprune.transform(model, fxprune.TopK(0.5, (1,)))  # the model itself has not run yet: nothing cached
    assert "kept as a leaf: norm_pre" in str(fxprune.trace(model).meta["fxprune_trace"])
    x = image_batch(model)
    with torch.no_grad():
        out = model(x)
        assert type(out) is torch.Tensor and all(type(table) is torch.Tensor for table in _TABLES.values())
        _TABLES.clear()
        torch.testing.assert_close(model(x), out, atol=0, rtol=0)
        assert type(gm(x)) is torch.Tensor


def test_a_model_compiled_by_torch_compile_is_refused_saying_to_pass_the_module_it_compiles():
    compiled = torch.compile(timm_vit("deit_small_patch16_224"))  # before: "missing the required forward function"
    with pytest.raises(TraceError, match=r"VisionTransformer compiled by torch.compile.*model\._orig_mod.*fxprune\."
                                         r"lower"):
        fxprune.transform(compiled, fxprune.EViT(0.5, (1,)))


def test_the_models_own_input_checks_say_the_sizes_of_the_input_they_reject():
    model = timm_vit("deit_small_patch16_224")  # made for 32²; before: "Input height (Proxy(getitem_2)) doesn't …"
    gm = fxprune.transform(model, fxprune.EViT(0.5, (1,)))
    for rewritten in (gm, copy.deepcopy(gm), fxprune.trace(model)):
        with pytest.raises(AssertionError, match=r"^Input width \(40\) doesn't match model \(32\)\.$"):
            rewritten(torch.randn(2, 3, 32, 40))
    assert gm(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_an_input_check_of_data_stays_torchs_own():
    class Checked(nn.Module):
        def forward(self, x):
            torch._assert(x.shape[1] == 8, f"want 8 columns, got {x.shape[1]}")
            torch._assert((x > -100).all(), f"values out of range in a batch of {x.shape[0]}")  # a tensor: data
            return x * 2

    called = [node.target for node in fxprune.trace(Checked(), torch.randn(2, 8)).graph.nodes
              if node.op == "call_function"]
    assert check_input in called and torch._assert in called  # compile and export handle a check of data apart


def test_an_input_check_whose_message_another_trace_formatted_keeps_its_message():
    from torchvision.models.feature_extraction import create_feature_extractor

    backbone = create_feature_extractor(torchvision_vit(), {"encoder": "tokens"})  # its code holds the messages
    checks = [node for node in fxprune.trace(backbone, torch.randn(2, 3, 32, 32)).graph.nodes  # of its own trace
              if node.op == "call_function" and node.target is torch._assert]
    assert any("Proxy(" in node.args[1] for node in checks)  # before: another node of the same name, run first


def test_example_inputs_the_model_rejects_are_refused_with_its_own_check_and_their_shape():
    model = timm_vit("deit_small_patch16_224")  # made for 32²; before: "found no attention … queries of unknown shape"
    with pytest.raises(TraceError, match=r"rejects the example inputs \[2, 3, 48, 48\] in patch_embed: Input height "
                                         r"\(48\) doesn't match model \(32\)\. Pass example_inputs"):
        fxprune.transform(model, fxprune.EViT(0.5, (1,)), example_inputs=(torch.randn(2, 3, 48, 48),))
