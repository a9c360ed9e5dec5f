"""The code a transformed model runs reads its modules, parameters and buffers from their owners' dictionaries; a
torch.fx tracer records its graph as it is."""

import copy
import inspect

import pytest
import torch
import torch.nn.utils.parametrize
from torch import nn
from vits import image_batch, saved_and_loaded, timm_vit

import fxprune
from fxprune import EViT, ToMe
from fxprune.capture.codegen import direct_path


def test_a_transformed_model_reads_its_weights_directly_and_live():
    model = timm_vit("deit_small_patch16_224", depth=3)
    fast = fxprune.transform(model, ToMe(r=4))
    source = inspect.getsource(type(fast).forward)
    assert "._modules['blocks']._modules['1']._modules['attn']" in source and "getattr(self" not in source
    assert "._modules[" not in fast.code  # what the user reads is fx's own code
    x = image_batch(model)
    with torch.no_grad():
        before = fast(x)
        mlp = fast.get_submodule("blocks.1.mlp")
        dense = mlp.fc1
        mlp.fc1 = nn.Linear(dense.in_features, dense.out_features)  # a module replaced after transform
        assert not torch.allclose(fast(x), before)
        mlp.fc1.load_state_dict(dense.state_dict())
        torch.testing.assert_close(fast(x), before, atol=0, rtol=0)


def test_a_copy_and_a_saved_and_loaded_model_read_their_weights_directly_too():
    model = timm_vit("deit_small_patch16_224", depth=3)
    fast = fxprune.transform(model, EViT(keep_rate=0.7, layers=(1,)))
    x = image_batch(model)
    with torch.no_grad():
        for copied in (copy.deepcopy(fast), saved_and_loaded(fast)):
            source = inspect.getsource(type(copied).forward)
            assert "._modules['blocks']._modules['1']._modules['attn']" in source and "getattr(self" not in source
            torch.testing.assert_close(copied(x), fast(x), atol=0, rtol=0)
            copied.get_submodule("blocks.2.mlp").fc2.bias.data += 1.0  # its own weights, read live
            assert not torch.allclose(copied(x), fast(x))


def test_direct_reads_keep_a_compiled_graph_whole():
    model = timm_vit("deit_small_patch16_224", depth=2)
    fast = fxprune.transform(model, EViT(keep_rate=0.7, layers=(1,)))
    x = image_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fast, backend="eager", fullgraph=True)(x), fast(x), atol=1e-6, rtol=0)


class _Doubled(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def test_a_parameter_parametrized_after_the_transform_is_refused_naming_it_and_one_parametrized_before_is_read():
    model = timm_vit("deit_small_patch16_224", depth=3)
    x = image_batch(model)
    fast = fxprune.transform(model, EViT(keep_rate=0.7, layers=(1,)))
    torch.nn.utils.parametrize.register_parametrization(fast.get_submodule("blocks.2.norm1"), "weight", _Doubled())
    with pytest.raises(fxprune.UnsupportedModelError, match=r"reads blocks\.2\.norm1\.weight as the parameter it was "
                       r"when it was transformed, and blocks\.2\.norm1 is now a .*\.Parametrized\w+ whose weight "
                       r"is not \(.*\): make such changes before fxprune.transform"):  # before: KeyError 'weight'
        fast(x)
    torch.nn.utils.parametrize.register_parametrization(model.blocks[2].norm1, "weight", _Doubled())
    with torch.no_grad():
        torch.testing.assert_close(fxprune.transform(model, EViT(keep_rate=1.0, layers=(1,)))(x), model(x),
                                   atol=1e-5, rtol=0)


def test_a_step_that_is_not_a_registered_module_or_parameter_is_read_as_an_attribute():
    class Shadowed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(2, 2)

        @property
        def weight(self):  # a class attribute wins over nn.Module's lookup
            return self.inner.weight

    root = nn.Module()
    root.block = Shadowed()
    root.block.register_buffer("scale", torch.ones(1))
    assert direct_path(root, "block.inner.bias") == "self._modules['block']._modules['inner']._parameters['bias']"
    assert direct_path(root, "block.scale") == "self._modules['block']._buffers['scale']"
    assert direct_path(root, "block.weight") == "self._modules['block'].weight"


def test_saving_a_model_pickles_its_graph_as_it_is_and_leaves_its_forward_alone():
    model = timm_vit("deit_small_patch16_224", depth=2)
    fast = fxprune.transform(model, EViT(keep_rate=0.7, layers=(1,)))
    x = image_batch(model)
    forward = type(fast).forward
    output = next(iter(fast.graph.find_nodes(op="output")))
    with fast.graph.inserting_before(output):  # an edit not yet recompiled
        shifted = fast.graph.call_function(torch.add, (output.args[0], 1.0))
    output.args = (shifted,)
    loaded = saved_and_loaded(fast)
    assert type(fast).forward is forward  # saving does not recompile
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fast(x) + 1.0, atol=1e-6, rtol=0)


def test_a_saved_and_loaded_model_keeps_its_class_name_and_is_captured_again_with_its_own_numbers():
    model = timm_vit("vit_tiny_patch16_224")
    x = image_batch(model)
    for fast in (fxprune.transform(model, EViT(0.5, (1,))), fxprune.transform(model, fxprune.AdaViT(0.5))):
        loaded = saved_and_loaded(fast)
        assert type(loaded).__name__ == "VisionTransformer"  # before: GraphModule
        torch.testing.assert_close(fxprune.trace(loaded, x)(x), fast(x), rtol=0, atol=0)  # before: a TraceError
        assert fxprune.flops(loaded, x) == fxprune.flops(fast, x) < fxprune.flops(model, x)
        copied = copy.deepcopy(loaded)  # before: a copy of a loaded model lost its plan and descriptions
        assert copied.fxprune_plan.policy == fast.fxprune_plan.policy and copied.pretrained_cfg == model.pretrained_cfg
        assert {type(copied).__name__, type(copy.deepcopy(fast)).__name__} == {"VisionTransformer"}  # not GraphModule
        report, saved = fxprune.report(loaded), fxprune.report(fast)  # before: a KeyError
        assert (str(report.plan), str(report.trace), len(report.inserted)) == \
            (str(saved.plan), str(saved.trace), len(saved.inserted))  # the inserted nodes' names are made again


def test_a_model_pickled_before_emit_moved_still_loads():
    model = timm_vit("deit_small_patch16_224", depth=2)
    fast = fxprune.transform(model, fxprune.AdaViT(0.5))
    load, (body, *codes, _) = fast.__reduce__()  # a file from then has no node records either
    moved, was = "from fxprune.ops.emitting import emit as", "from fxprune.passes.learned import emit as"
    before = [(source, imports.replace(moved, was)) for source, imports in codes]
    assert all(moved in imports for _, imports in codes) and not any(moved in imports for _, imports in before)
    x = image_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(load(body, *before)(x), fast(x), atol=0, rtol=0)


def _targets(graph):
    return [node.target for node in graph.nodes]


def test_torch_fx_symbolic_trace_records_each_modes_graph_as_it_is():
    model = timm_vit("deit_small_patch16_224")
    x = image_batch(model)
    for policy in (EViT(0.7, layers=(1, 2)), fxprune.AdaViT(0.5, init_logit=0.0)):
        gm = fxprune.transform(model, policy)
        assert list(inspect.signature(type(gm).forward).parameters) == ["self", "x"]  # the graph's inputs
        for training in (False, True):
            gm.train(training)
            traced = torch.fx.symbolic_trace(gm).train(training)
            graph = gm.train_graph if training and hasattr(gm, "train_graph") else gm.graph
            assert _targets(traced.graph) == _targets(graph)  # fxprune's functions as single calls
            torch.manual_seed(0)  # AdaViT's training graph draws Gumbel noise
            expected = gm(x)
            torch.manual_seed(0)
            torch.testing.assert_close(traced(x), expected, atol=0, rtol=0)


class _Scaled(nn.Module):
    """A transformed model inside another module."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.backbone(x) * self.scale


def test_torch_fx_symbolic_trace_reads_a_transformed_submodules_attributes_at_its_path():
    model = timm_vit("deit_small_patch16_224")
    outer = _Scaled(fxprune.transform(model, EViT(0.7, layers=(1, 2))))
    traced = torch.fx.symbolic_trace(outer)
    reads = [node.target for node in traced.graph.nodes if node.op == "get_attr"]
    assert "backbone.cls_token" in reads and all(read.startswith("backbone.") or read == "scale" for read in reads)
    x = image_batch(model)
    torch.testing.assert_close(traced(x), outer(x), atol=0, rtol=0)


def test_fx_graph_mode_quantization_quantizes_a_transformed_model_as_the_dense_one():
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model = timm_vit("deit_small_patch16_224")
    x = image_batch(model, batch=8)

    def quantized(gm):
        """``gm`` quantized to int8 after calibration on ``x``, and its largest error there."""
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # FX graph mode quantization is deprecated in favour of torchao's
            prepared = prepare_fx(gm, get_default_qconfig_mapping("x86"), (x,))
            prepared(x)
            result = convert_fx(prepared)
            return result, (result(x) - gm(x)).abs().max()

    reduced, error = quantized(fxprune.transform(model, ToMe(2)))
    assert any(isinstance(module, torch.ao.nn.quantized.Linear) for module in reduced.modules())
    assert error < 2 * quantized(torch.fx.symbolic_trace(model))[1]
