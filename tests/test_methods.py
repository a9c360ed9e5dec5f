"""The contract every registered token-reduction method keeps, run over the registry (as timm's
``tests/test_models.py`` runs every model): a method added later is covered without a line here.

Each method brings two settings (see :class:`fxprune.methods.Method`): ``identity(layers)``, which changes
nothing, and ``example(layers)``, which reduces. The per-method test files keep only what is particular to a
method: its comparisons with the independent implementations of ``tests/reference.py``, and its own behaviours.
"""

import io

import pytest
import torch
from vits import (
    ALL_MODELS,
    assert_compiles_once,
    assert_each_image_gets_what_it_gets_alone,
    assert_same_outputs,
    digit_scenes,
    digits_vit,
    hf_vit,
    image_batch,
    logits,
    timm_vit,
    with_explicit_softmax,
)

import fxprune
from fxprune import ATS, Compose
from fxprune.analysis import SDPA_TARGETS
from fxprune.capture import reusing_captures
from fxprune.methods import get_method, method_of, methods
from fxprune.tools.show import kept_counts

METHODS = {method.name: method for method in methods()}
LAYERS = (1, 2)  # where the example setting reduces, after a dense block
EVERY_BLOCK = (0, 1, 2, 3)  # of each model of the test zoo


@pytest.fixture(params=sorted(METHODS))
def method(request):
    return METHODS[request.param]


def _deit() -> torch.nn.Module:
    """A DeiT-S-shaped ViT (fused attention, 6 heads) of 3 blocks: LAYERS and a dense block before them."""
    return timm_vit("deit_small_patch16_224", depth=3)


def _rewritten_blocks(gm) -> set[int]:
    """The blocks fxprune inserted nodes for."""
    return {n.meta["fxprune"].block for n in gm.graph.nodes if "fxprune" in n.meta}


def test_spec_gives_settings_of_its_own_policy(method):
    assert get_method(method.name) is method
    assert method.example is not None, f"{method.name} registers no example setting for the contract tests"
    settings = [method.example(LAYERS)] + ([method.identity(LAYERS)] if method.identity is not None else [])
    for policy in settings:
        assert isinstance(policy, method.policy) and method_of(policy) is method


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_identity_setting_reproduces_every_architecture(name):
    model = ALL_MODELS[name]()
    with reusing_captures():  # the model is captured once for every method
        for method in methods():
            if method.identity is None:  # none of its settings leaves the model unchanged
                continue
            gm = fxprune.transform(model, method.identity(EVERY_BLOCK))
            assert len(gm.fxprune_plan.rows) == len(EVERY_BLOCK), method.name
            assert _rewritten_blocks(gm) >= set(EVERY_BLOCK), method.name  # each block rewritten, not skipped
            assert_same_outputs(gm, model, atol=1e-5, what=method.name)


def test_a_padded_batch_gives_each_image_what_it_gets_alone(method):
    # ATS first keeps a different number of tokens per image; the method then works on the padded batch
    # (and pads itself, where it does)
    policy = Compose([ATS(None, (1,)), method.example((2, 3))])
    gm = fxprune.transform(digits_vit(depth=4), policy)
    x = digit_scenes(8)[[3, 5, 0, 1]]  # ATS keeps 23, 15, 20 and 18 of their 65 tokens
    (_, _, low, high), *later = kept_counts(gm, x)
    assert high - low >= 6 and all(high - low >= 1 for _, _, low, high in later)  # the padding reaches every block
    assert_each_image_gets_what_it_gets_alone(gm, x, atol=1e-4)


def test_an_empty_batch_gives_an_empty_output_in_both_modes(method):
    model = _deit()
    gm = fxprune.transform(model, method.example(LAYERS))
    empty = image_batch(model)[:0]
    for training in (False, True):  # before: ATS, ClusTR and AdaViT's skipping graph failed on it
        assert logits(gm.train(training)(empty)).shape == model(empty).shape


def test_gradients_reach_the_backbone(method):
    model = _deit().train()
    gm = fxprune.transform(model, method.example(LAYERS))
    assert gm.training
    gm(image_batch(model)).logsumexp(-1).sum().backward()
    assert gm.get_parameter("patch_embed.proj.weight").grad.abs().sum() > 0
    width = model.embed_dim
    for block in range(len(model.blocks)):
        grad = gm.get_parameter(f"blocks.{block}.attn.qkv.weight").grad
        for part, rows in zip("qkv", grad.split(width)):
            assert rows.abs().sum() > 0, f"no gradient reaches block {block}'s {part} projection"


def test_compiles_once_with_fullgraph(method):
    model = _deit()
    # fxprune.lower compiles with fullgraph=True; batches 4, 4, 6 and 3 from one graph, same outputs as eager
    assert_compiles_once(fxprune.transform(model, method.example(LAYERS)), model)


def test_explicit_softmax_matches_fused_attention(method):
    model = _deit().double()
    policy = method.example(LAYERS)
    fused = fxprune.transform(model, policy)
    explicit = fxprune.transform(with_explicit_softmax(model), policy)
    explicit.load_state_dict(fused.state_dict())  # the same learned parts, if any (made anew by each transform)
    assert any(n.target in SDPA_TARGETS for n in fused.graph.nodes)
    assert not any(n.target in SDPA_TARGETS for n in explicit.graph.nodes)
    x = image_batch(model, batch=4, dtype=torch.float64)
    with torch.no_grad():
        out = fused(x)
        torch.testing.assert_close(explicit(x), out, atol=1e-6, rtol=0)
        assert (out - model(x)).abs().max() > 1e-4  # the example reduces, so the match means something


def test_state_dict_loads_into_the_original_and_back(method):
    model = hf_vit()
    gm = fxprune.transform(model, method.example(LAYERS), copy_weights=True)
    learned = {k: v for k, v in gm.state_dict().items() if k.startswith("fxprune.")}  # a learned method's parts
    assert gm.state_dict().keys() - learned.keys() == model.state_dict().keys()
    assert not model.load_state_dict(gm.state_dict(), strict=not learned).missing_keys
    x = image_batch(model)
    with torch.no_grad():
        before = logits(gm(x))
        torch.manual_seed(1)
        state = model.state_dict()
        changed = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
        gm.load_state_dict({**changed, **learned}, strict=True)
        assert (logits(gm(x)) - before).abs().max() > 1e-4  # it computes with the weights loaded into it
        gm.load_state_dict({**model.state_dict(), **learned}, strict=True)
        torch.testing.assert_close(logits(gm(x)), before, atol=0, rtol=0)


def test_survives_save_and_load(method):
    model = hf_vit()
    gm = fxprune.transform(model, method.example(LAYERS))
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = image_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded(x)), logits(gm(x)), atol=0, rtol=0)
    assert str(loaded.fxprune_plan) == str(gm.fxprune_plan)
