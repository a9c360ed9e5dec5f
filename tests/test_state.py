"""Token-state threading: a rewrite that reads a channel gets the state of the rows entering its block, whatever
the earlier blocks did. A probe method registered here emits the sizes and positions it reads; the oracle is
``fxprune.show``'s source tracking (which original tokens each row stands for), computed independently."""

import dataclasses

import pytest
import torch
from vits import image_batch, timm_vit

import fxprune
from fxprune import ATS, Compose, EViT, ToMe, TopK
from fxprune.methods import register_method, unregister_method
from fxprune.ops import POSITIONS, SIZES
from fxprune.ops.emitting import collect, emit
from fxprune.passes.common import Rewrite
from fxprune.passes.state import read_state
from fxprune.policies import Policy, check_layers
from fxprune.tools.show import token_sources


@dataclasses.dataclass(frozen=True)
class Probe(Policy):
    layers: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "layers", check_layers(self.layers, "Probe"))

    def tokens_out(self, tokens_in, prefix, layer):
        return tokens_in

    def describe(self):
        return "probe"


def _probe(gm, program, block, policy):
    for channel in (SIZES, POSITIONS):
        state = read_state(gm, block, channel)
        with gm.graph.inserting_after(state):
            gm.graph.call_function(emit, (state, channel))
    return Rewrite()


@pytest.fixture(autouse=True, scope="module")
def registered():
    register_method("test_probe", Probe, reduces_tokens=False)(_probe)
    yield
    unregister_method("test_probe")


def _read(gm, x):
    with collect() as aux, torch.no_grad():
        gm(x)
    return aux[SIZES][0][..., 0], aux[POSITIONS][0][..., 0]


def _oracle(gm, x):
    """Sizes of the rows after the last reduction, and which original tokens each stands for ``[B, N, N0]``, from
    the rows' source tokens."""
    sources = token_sources(gm, x)[-1].sources != 0
    return sources.sum(-1), sources


CHAINS = {
    "topk-tome-evit": Compose([TopK(0.6, (1,)), ToMe(3, (2,)), EViT(0.5, (3,)), Probe((4,))]),
    "ats-padded": Compose([ATS(None, (0,)), TopK(0.7, (1,)), ToMe(2, (2,)), EViT(0.6, (3,)), Probe((4,))]),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_a_rewrite_reads_the_sizes_and_positions_of_the_rows_entering_its_block(name):
    model = timm_vit("deit_small_patch16_224", depth=6)
    gm = fxprune.transform(model, CHAINS[name])
    x = image_batch(model, batch=4)
    sizes, positions = _read(gm, x)
    count, sources = _oracle(gm, x)
    assert torch.equal(sizes.round().long(), count)
    real = count > 0
    assert (positions[~real] == -1).all() and (positions[real] >= 0).all()  # −1 only for padding
    assert sources.gather(2, positions.clamp(min=0).long()[..., None])[..., 0][real].all()  # one of its patches
    assert (positions[:, 0] == 0).all() and (count > 1).any()  # the class token; merged or fused rows
    if name == "ats-padded":
        alone = [_read(gm, x[i : i + 1]) for i in range(len(x))]
        for i, (size, where) in enumerate(alone):
            own = size.shape[1]
            assert torch.equal(positions[i, :own], where[0]) and (positions[i, own:] == -1).all()


def test_a_rewrite_before_any_reduction_reads_each_row_as_itself():
    model = timm_vit("deit_small_patch16_224")
    gm = fxprune.transform(model, Compose([Probe((1,)), TopK(0.5, (2,))]))
    sizes, positions = _read(gm, image_batch(model))
    assert (sizes == 1).all() and torch.equal(positions[0], torch.arange(17))


def test_a_rewrite_that_replaces_the_attention_under_a_keep_policy_without_declaring_it_is_refused():
    from fxprune import ClusTR, DynamicViT
    from fxprune.methods.clustr import cluster_attention

    @dataclasses.dataclass(frozen=True)
    class Undeclared(ClusTR):  # ClusTR's rewrite, registered without keeps_attention=False
        pass

    register_method("undeclared_clustr", Undeclared, needs_keys=True, reduces_tokens=False)(cluster_attention)
    try:
        with pytest.raises(fxprune.UnsupportedModelError, match=r"block 2 \(blocks\.2\): its rewrite replaced"):
            fxprune.transform(timm_vit("deit_small_patch16_224"), Compose([DynamicViT(0.7, (1,)), Undeclared(4, (2,))]))
    finally:
        unregister_method("undeclared_clustr")


def test_a_keep_policy_renormalises_the_attention_as_a_later_rewrite_left_it_with_adavits_gated_heads():
    import operator

    from fxprune import AdaViT, DynamicViT
    from fxprune.ops.gating import head_gate
    from fxprune.ops.pruning import policy_attention

    gm = fxprune.transform(timm_vit("deit_small_patch16_224"), Compose([DynamicViT(0.7, (1,)), AdaViT(0.5, (2, 3))]))
    kept = [node for node in gm.train_graph.nodes if node.target is policy_attention]
    assert len(kept) == 3  # DynamicViT's block and the two after it
    for node in kept[1:]:  # AdaViT's blocks: q, k and v with the unused heads zeroed, as its SDPA call read them
        assert all(arg.target is operator.mul and arg.args[1].target is head_gate for arg in node.args[:3])
