"""Every method on the zoo (tiny timm, torchvision, Hugging Face and hand-written ViTs): rewritten and checked, or
refused with a reason; never a crash or a silent wrong output. Budget: about a minute alone (two worker processes),
100–150 s in the suite, beside the other pytest worker (125 s on 2026-12-07)."""

import functools
import re
from pathlib import Path

import pytest
import torch
from vits import HandWrittenViT, Stage

from fxprune.methods import get_method
from fxprune.tools.zoo import MARKERS, ZOO, Outcome, short_reason, table, try_all, try_method, with_table

README = Path(__file__).resolve().parents[1] / "README.md"


@functools.cache
def _everything() -> dict[str, list[Outcome]]:
    """Every zoo entry's outcomes, tried once, two models at a time (a crash in a worker fails the first test)."""
    return dict(zip((entry.name for entry in ZOO), try_all(ZOO, processes=2)))


def _outcomes(entry) -> list[Outcome]:
    return _everything()[entry.name]


def test_the_zoo_covers_thirty_timm_architectures_and_the_other_sources():
    sources = [entry.source for entry in ZOO]
    assert sources.count("timm") >= 30
    assert {"torchvision", "hf"} <= set(sources) and sources.count("hand-written") >= 3


@pytest.mark.parametrize("entry", ZOO, ids=[entry.name for entry in ZOO])
def test_each_method_is_rewritten_and_checked_or_refused_with_a_reason(entry):
    for outcome in _outcomes(entry):  # any exception other than an fxprune refusal fails here: a crash
        assert outcome.sound, f"{entry.name} with {outcome.method} fails its checks: {outcome}"
        if not outcome.rewritten:  # the reason names the part of the model it is about
            assert any(part in outcome.refusal for part in ("block", "node", "no attention", "class token"))


def test_plain_vits_and_each_source_take_every_parameter_free_method():
    for name in ("vit_tiny_patch16_224", "torchvision vit (MultiheadAttention)",
                 "Hugging Face ViTForImageClassification", "hand-written: summary token read alone"):
        entry = next(entry for entry in ZOO if entry.name == name)
        assert all(outcome.rewritten for outcome in _outcomes(entry)), name


def test_every_refusal_in_the_table_is_said_in_a_few_words():
    reasons = {outcome.refusal for entry in ZOO for outcome in _outcomes(entry) if not outcome.rewritten}
    assert not [reason for reason in reasons if short_reason(reason) == reason[:60]]  # else: its first 60 characters


def test_the_readme_shows_the_table_the_command_prints():
    text = table([outcome for entry in ZOO for outcome in _outcomes(entry)])
    readme = README.read_text()
    assert with_table(readme, text) == readme, "the README's zoo table is stale: run `fxprune zoo --write README.md`"
    assert readme.count(MARKERS[0]) == 1


class _ReshapesToTheCapturedBatch(Stage):
    def forward(self, tokens):
        return super().forward(tokens.reshape(2, tokens.shape[1], -1))  # the batch size, written as a literal


def test_a_rewrite_that_fails_at_another_batch_size_gets_the_refusal_transform_gives():
    # the zoo checks each rewrite's shapes at the captured batch size only; running it on three images fails here,
    # and transform's check at a second batch size gives the reason
    torch.manual_seed(0)
    model = HandWrittenViT().eval()
    model.stages[3] = _ReshapesToTheCapturedBatch(48, 3)
    outcome = try_method(model, "a batch size written as a literal", get_method("evit"))
    assert not outcome.rewritten and re.search(r"in stages\.3\.\w+ fails on a batch of 3", outcome.refusal)
