"""The method seam fails loudly: a rewrite that breaks the contract, or a method registered wrongly, is refused
with what to do, instead of a wrong graph."""

import dataclasses

import pytest
import torch
from vits import timm_vit

import fxprune
from fxprune.methods import get_method, methods, register_method, unregister_method
from fxprune.passes.common import Rewrite, reroute_stream
from fxprune.policies import Policy, check_layers, option, parse_layers, parse_number


@dataclasses.dataclass(frozen=True)
class Halve(Policy):
    keep: float = option(parse_number, "k")
    layers: tuple[int, ...] = option(parse_layers, default=(1,))

    def __post_init__(self):
        object.__setattr__(self, "layers", check_layers(self.layers, "Halve"))

    def tokens_out(self, tokens_in, prefix, layer):
        return tokens_in // 2

    def describe(self):
        return "halve"


def first_half(x: torch.Tensor) -> torch.Tensor:  # deliberately not declared with @graph_op
    return x[:, : x.shape[1] // 2]


@pytest.fixture
def register():
    names = []

    def add(name, rewrite, **spec):
        register_method(name, Halve, **spec)(rewrite)
        names.append(name)

    yield add
    for name in names:
        unregister_method(name)


def test_a_reducing_rewrite_that_names_no_stream_node_is_refused(register):
    register("test_silent", lambda gm, program, block, policy: Rewrite())
    with pytest.raises(fxprune.FxPruneError, match="test_silent.*names no stream node: return Rewrite"):
        fxprune.transform(timm_vit("deit_small_patch16_224"), Halve(0.5))


def test_a_stream_through_an_undeclared_function_is_refused(register):
    register("test_undeclared", lambda gm, program, block, policy: Rewrite(
        reroute_stream(gm, block, first_half, (), "half")
    ))
    with pytest.raises(fxprune.FxPruneError, match="not declared as a stream function.*graph_op"):
        fxprune.transform(timm_vit("deit_small_patch16_224"), Halve(0.5))


def test_a_spec_that_says_it_carries_sizes_when_its_stream_does_not_is_refused(register):
    from fxprune.ops import gather_tokens

    def rewrite(gm, program, block, policy):  # the contract is checked before the graph runs: any rows will do
        with gm.graph.inserting_after(block.mid):
            rows = gm.graph.call_function(torch.arange, (8,))
        return Rewrite(reroute_stream(gm, block, gather_tokens, (rows,), "rows"))

    register("test_sizes", rewrite, carries_sizes=True)
    with pytest.raises(fxprune.FxPruneError, match="carries_sizes=True.*gather_tokens is not sized"):
        fxprune.transform(timm_vit("deit_small_patch16_224"), Halve(0.5))


def test_a_registered_method_parses_from_text_with_its_option_names(register):
    register("test_parse", lambda gm, program, block, policy: Rewrite())
    assert fxprune.parse_policy("test_parse:k=0.25,layers=2-3") == Halve(0.25, (2, 3))
    with pytest.raises(fxprune.PolicyError, match="unknown option 'x'; known: keep, k, layers"):
        fxprune.parse_policy("test_parse:x=1")
    assert get_method("TEST_PARSE").policy is Halve and "test_parse" in [m.name for m in methods()]


def test_only_policy_dataclasses_register_and_each_policy_once(register):
    with pytest.raises(fxprune.PolicyError, match="is not a Policy dataclass"):
        register_method("test_bad", int)
    register("test_once", lambda gm, program, block, policy: Rewrite())
    with pytest.raises(fxprune.PolicyError, match="Halve is already registered as method 'test_once'"):
        register_method("test_twice", Halve)(lambda gm, program, block, policy: Rewrite())
    with pytest.raises(fxprune.PolicyError, match="unknown policy 'nope'"):
        fxprune.parse_policy("nope:k=1")
