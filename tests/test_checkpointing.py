import copy

import pytest
import torch
from vits import image_batch, saved_and_loaded, timm_vit

import fxprune
from fxprune.passes.checkpointing import checkpointed


def _saved_tensors(run) -> tuple[object, int]:
    """``run()`` and how many tensors autograd saved for the backward pass while it ran."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        return run(), len(saved)


def _trained(gm: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int, dict, dict]:
    """One training step's output, saved tensors, gradients and emitted values (how many per key) of ``gm`` on
    ``x`` from a fixed random seed."""
    gm.train()
    gm.zero_grad(set_to_none=True)  # the parameters are the model's, shared by every transform of it
    torch.manual_seed(3)
    with fxprune.collect() as aux:
        out, saved = _saved_tensors(lambda: gm(x))
        out.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in gm.named_parameters() if p.grad is not None}
    return out.detach(), saved, grads, {key: len(values) for key, values in aux.items()}


@pytest.mark.parametrize("policy", [fxprune.ToMe(r=2), fxprune.DynamicViT(0.7, layers=(1, 2))],
                         ids=["tome", "dynamicvit"])
def test_a_model_with_gradient_checkpointing_trains_each_block_checkpointed_as_without(policy):
    model = timm_vit("deit_small_patch16_224", depth=3, drop_path_rate=0.3).train()
    x = image_batch(model)
    plain = fxprune.transform(model, policy)
    model.set_grad_checkpointing(True)
    gm = fxprune.transform(model, policy)
    gm.load_state_dict(plain.state_dict())  # the same decision heads
    assert len(gm.train_graph.find_nodes(op="call_function", target=checkpointed)) == 3
    assert any("the training graph runs each of its 3 blocks checkpointed" in note for note in gm.fxprune_plan.notes)
    expected, saved_without, grads, emitted = _trained(plain, x)
    for trained in (gm, copy.deepcopy(gm), saved_and_loaded(gm)):
        out, saved, checkpointed_grads, checkpointed_emitted = _trained(trained, x)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)  # the same dropped paths and Gumbel noise
        assert checkpointed_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=0)
        assert checkpointed_emitted == emitted  # emitted once per call, not again when a block is computed again
        assert saved < saved_without / 3  # each block keeps its inputs, not its activations
    gm.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), plain.eval()(x), atol=0, rtol=0)
