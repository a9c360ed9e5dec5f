"""Learned passes, with a small learned method registered here as a user would: a linear token gate.

Evaluation keeps the top half of the patch tokens by the gate's score (rows removed); training keeps every row
and scales each patch token by ``sigmoid(score)`` (differentiable, static shapes), emitting the mean gate.
"""

import dataclasses
import inspect
import math

import pytest
import timm
import torch
from torch import Tensor, nn
from vits import image_batch, saved_and_loaded, timm_vit

import fxprune
from fxprune.methods import Learned, register_method, unregister_method
from fxprune.ops import gather_tokens, graph_op
from fxprune.ops.emitting import collect, emit
from fxprune.ops.selection import after_prefix
from fxprune.passes.common import Rewrite, Role, insert_call, reroute_stream
from fxprune.passes.learned import TrainEvalGraphModule, insert_module, save_weights
from fxprune.policies import Policy, check_layers, option, parse_layers


@dataclasses.dataclass(frozen=True)
class Gate(Policy):
    layers: tuple[int, ...] = option(parse_layers)
    weights: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "layers", check_layers(self.layers, "Gate"))

    def tokens_out(self, tokens_in, prefix, layer):
        return prefix + math.ceil((tokens_in - prefix) / 2)

    def describe(self):
        return "gate half"


@graph_op()
def gate_rows(scores: Tensor, num_prefix: int) -> Tensor:
    """The prefix rows and the top half of the other rows by ``scores`` ``[B, N, 1]``."""
    patches = scores[:, num_prefix:, 0]
    keep = math.ceil(patches.shape[1] / 2)
    return after_prefix(patches.topk(keep, dim=1).indices, num_prefix)


@graph_op()
def gate_tokens(x: Tensor, scores: Tensor, num_prefix: int) -> Tensor:
    """``x`` ``[B, N, C]`` with each non-prefix row scaled by ``sigmoid(score)``."""
    gate = torch.sigmoid(scores)
    gate = torch.cat([torch.ones_like(gate[:, :num_prefix]), gate[:, num_prefix:]], dim=1)
    emit(gate[:, num_prefix:].mean(), "gate")
    return x * gate


def _modules(policy, block, program):
    torch.manual_seed(block.index)
    return {"predictor": nn.Linear(program.dim, 1)}


def _train(gm, program, block, policy):
    scores = insert_module(gm, block.mid, block, "predictor", (block.mid,))
    gated = insert_call(gm, scores, gate_tokens, (block.mid, scores, program.prefix_tokens), {}, block, "gated")
    block.mid.replace_all_uses_with(gated, delete_user_cb=lambda user: user not in (scores, gated))
    return Rewrite()


def _evaluate(gm, program, block, policy):
    scores = insert_module(gm, block.mid, block, "predictor", (block.mid,))
    rows = insert_call(gm, scores, gate_rows, (scores, program.prefix_tokens), {}, block, "rows", Role.ROWS)
    return Rewrite(reroute_stream(gm, block, gather_tokens, (rows,), "gate"), rows)


@pytest.fixture(autouse=True, scope="module")
def registered():
    register_method("test_gate", Gate, learned=Learned(_modules, _train))(_evaluate)
    yield
    unregister_method("test_gate")


def test_training_graph_keeps_every_row_and_evaluation_graph_removes_them():
    model = timm_vit("deit_small_patch16_224")
    gm = fxprune.transform(model, Gate((1,)))
    assert isinstance(gm, TrainEvalGraphModule) and not gm.training
    assert gm.fxprune_plan.rows[1].tokens_out == 1 + 8
    assert any(n.target is gate_rows for n in gm.graph.nodes)
    assert any(n.target is gate_tokens for n in gm.train_graph.nodes)
    x = image_batch(model)
    with torch.no_grad():
        evaluated = gm(x)
        trained = gm.train()(x)
        again = gm.eval()(x)
    assert not torch.allclose(evaluated, trained) and torch.equal(evaluated, again)


def test_evaluation_graph_calls_no_dropout_or_identity_and_training_graph_keeps_them():
    model = timm_vit("deit_small_patch16_224", drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.1)
    gm = fxprune.transform(model, Gate((1,)))
    idle = (nn.Dropout, nn.Identity, timm.layers.DropPath)

    def idle_calls(graph):
        return [n for n in graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), idle)]

    assert not idle_calls(gm.graph) and len(idle_calls(gm.train_graph)) >= 4 * len(model.blocks)
    still = fxprune.transform(timm_vit("deit_small_patch16_224"), Gate((1,)))  # no dropout at all
    still.load_state_dict(gm.state_dict())
    x = image_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), still(x), atol=0, rtol=0)
        trained = [gm.train()(x) for _ in range(2)]
    assert not torch.allclose(*trained)  # dropout still runs in training


def test_predictors_live_under_stable_names_shared_by_both_graphs_and_load_into_the_original():
    model = timm_vit("deit_small_patch16_224")
    gm = fxprune.transform(model, Gate((1, 2)))
    assert isinstance(gm.get_submodule("fxprune.blocks_1.predictor"), nn.Linear)
    state = gm.state_dict()
    extra = sorted(set(state) - set(model.state_dict()))
    assert extra == [f"fxprune.blocks_{i}.predictor.{p}" for i in (1, 2) for p in ("bias", "weight")]
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.unexpected_keys) == extra and not result.missing_keys
    with torch.no_grad():
        for index in (1, 2):
            gm.get_submodule(f"fxprune.blocks_{index}.predictor").bias.fill_(100.0)  # every gate open in training
    x = image_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(gm.train()(x), model(x), atol=1e-5, rtol=0)


def test_gradients_reach_the_predictor_and_the_backbone_and_aux_values_are_collected():
    model = timm_vit("deit_small_patch16_224")
    gm = fxprune.transform(model, Gate((1,)), copy_weights=True).train()
    with collect() as aux:
        loss = gm(image_batch(model)).sum()
    loss.backward()
    assert list(aux) == ["gate"] and aux["gate"][0].requires_grad
    assert gm.get_submodule("fxprune.blocks_1.predictor").weight.grad.abs().sum() > 0
    assert gm.get_parameter("blocks.0.attn.qkv.weight").grad.abs().sum() > 0
    with torch.no_grad():
        gm.eval()(image_batch(model))
    assert "gate" in aux and len(aux["gate"]) == 1  # nothing emitted outside the context


def test_trained_weights_travel_as_a_file_and_a_mismatching_file_is_refused(tmp_path):
    model = timm_vit("deit_small_patch16_224")
    gm = fxprune.transform(model, Gate((1,)))
    with torch.no_grad():
        gm.get_submodule("fxprune.blocks_1.predictor").weight.normal_()
    path = save_weights(gm, tmp_path / "gate.pt")
    loaded = fxprune.transform(model, Gate((1,), weights=str(path)))
    x = image_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gm(x), atol=0, rtol=0)
    with pytest.raises(fxprune.PolicyError, match=r"do not fit.*missing fxprune_blocks|missing blocks_2"):
        fxprune.transform(model, Gate((2,), weights=str(path)))


@pytest.mark.parametrize("copy", ["save-load", "deepcopy"])
def test_both_graphs_survive_save_load_and_deepcopy(copy):
    import copy as copying

    model = timm_vit("deit_small_patch16_224")
    gm = fxprune.transform(model, Gate((1,)))
    if copy == "save-load":
        restored = saved_and_loaded(gm)
    else:
        restored = copying.deepcopy(gm)
    assert isinstance(restored, TrainEvalGraphModule) and restored.fxprune_plan == gm.fxprune_plan
    x = image_batch(model)
    with torch.no_grad():
        for mode in (False, True):
            torch.testing.assert_close(restored.train(mode)(x), gm.train(mode)(x), atol=0, rtol=0)


def test_both_graphs_compile_as_one_graph_and_the_training_graph_still_emits():
    model = timm_vit("deit_small_patch16_224")
    gm = fxprune.transform(model, Gate((1,)))
    compiled = torch.compile(gm, backend="eager", fullgraph=True)
    x = image_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), gm(x), atol=1e-6, rtol=0)
        gm.train()
        with collect() as aux:
            torch.testing.assert_close(compiled(x), gm(x), atol=1e-6, rtol=0)
    assert len(aux["gate"]) == 2  # once compiled, once eager


def test_both_graphs_read_modules_and_parameters_from_their_owners_at_each_call():
    model = timm_vit("deit_small_patch16_224")
    gm = fxprune.transform(model, Gate((1,)))
    for forward in (type(gm)._eval_forward, type(gm)._train_forward):
        source = inspect.getsource(forward)
        assert "._modules['blocks']._modules['1']" in source and "._parameters['" in source
    assert "._modules[" not in gm.code  # what the user reads is fx's own code
    x = image_batch(model)
    with torch.no_grad():
        before = {mode: gm.train(mode)(x) for mode in (False, True)}
        mlp, predictor = gm.get_submodule("blocks.1.mlp"), gm.get_submodule("fxprune.blocks_1.predictor")
        dense = mlp.fc2
        mlp.fc2 = nn.Linear(dense.in_features, dense.out_features)
        predictor.weight = nn.Parameter(-predictor.weight)
        for mode in (False, True):
            assert not torch.allclose(gm.train(mode)(x), before[mode])
        mlp.fc2.load_state_dict(dense.state_dict())
        predictor.weight = nn.Parameter(-predictor.weight)
        for mode in (False, True):
            torch.testing.assert_close(gm.train(mode)(x), before[mode], atol=0, rtol=0)

