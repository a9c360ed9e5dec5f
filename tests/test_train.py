"""The trainer: it lowers the loss, resumes where it stopped, and under torchrun (2 CPU processes, gloo) takes
the same steps as one process with the same global batch."""

from pathlib import Path

import pytest
import torch
from torchrun import torchrun

import fxprune
from fxprune.tools.datasets import DigitScenes
from fxprune.tools.models import digits_vit
from fxprune.tools.train import TrainConfig, train

HERE = Path(__file__).parent
DATA = DigitScenes("train", 64, seed=0)
SMALL = TrainConfig(steps=3, batch_size=8, warmup=1, lr=1e-3)


def test_training_steps_change_the_weights_and_resume_where_they_stopped(tmp_path):
    policy = fxprune.EViT(0.7, (1, 3, 4))
    whole = train(digits_vit(), policy, DATA, SMALL, progress=False)
    first = train(digits_vit(), policy, DATA, TrainConfig(**{**SMALL.__dict__, "steps": 2}), progress=False,
                  checkpoint=tmp_path / "ckpt.pt")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 2
    resumed = train(digits_vit(), policy, DATA, SMALL, progress=False, checkpoint=tmp_path / "ckpt.pt", resume=True)
    assert resumed.losses[:2] == first.losses and len(resumed.losses) == 3
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, atol=1e-6, rtol=0)
    moved = [k for k, v in whole.model.state_dict().items() if not torch.equal(v, digits_vit().state_dict()[k])]
    assert moved  # the steps trained it


def test_a_frozen_backbone_trains_only_the_learned_parts():
    policy = fxprune.DynamicViT(0.7, (1, 3, 4))
    result = train(digits_vit(), policy, DATA, TrainConfig(**{**SMALL.__dict__, "freeze_backbone": 3}),
                   progress=False)
    original = digits_vit().state_dict()
    state = result.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.items())
    assert all(torch.isfinite(torch.tensor(result.losses)))


DDP_POLICIES = ["evit:keep=0.7,layers=1,3,4", "dynamicvit:keep=0.7,layers=1,3,4"]


@pytest.fixture(scope="module")
def trained_in_two_processes(tmp_path_factory) -> dict[str, list[dict]]:
    """Each of ``DDP_POLICIES`` → what each of two processes under one torchrun ends with (weights, losses)."""
    out = tmp_path_factory.mktemp("ddp")
    torchrun([str(HERE / "ddp_train.py"), str(out), *DDP_POLICIES], HERE)
    return {policy: [torch.load(out / f"rank{rank}_{i}.pt", weights_only=False) for rank in (0, 1)]
            for i, policy in enumerate(DDP_POLICIES)}


def _without_keys(qkv_bias: torch.Tensor) -> torch.Tensor:
    """The query and value parts of a fused ``qkv`` bias ``[3C]``."""
    q, _, v = qkv_bias.chunk(3)
    return torch.cat([q, v])


@pytest.mark.parametrize("policy", DDP_POLICIES)
def test_two_processes_end_with_identical_weights(trained_in_two_processes, policy):
    ranks = trained_in_two_processes[policy]
    for key, value in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][key], value, atol=0, rtol=0)
    if policy.startswith("evit"):  # deterministic: the same steps as one process with the same global batch
        alone = train(digits_vit(), fxprune.parse_policy(policy), DATA, SMALL, progress=False)
        for key, value in alone.model.state_dict().items():
            got = ranks[0]["state"][key]
            if key.endswith("attn.qkv.bias"):  # a key bias gets no gradient (the softmax ignores it), only rounding
                got, value = _without_keys(got), _without_keys(value)  # noise, which AdamW scales up to ±lr
            torch.testing.assert_close(got, value, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(alone.losses), atol=1e-5, rtol=0)


def test_the_keep_rate_warms_up_from_one_along_a_cosine_through_a_few_graphs():
    from fxprune.tools.train import _keep_rate_at

    config = TrainConfig(**{**SMALL.__dict__, "steps": 6, "keep_warmup": 4, "keep_levels": 2})
    assert [_keep_rate_at(step, 0.5, config) for step in range(6)] == [1.0, 1.0, 0.75, 0.75, 0.5, 0.5]
    result = train(digits_vit(), fxprune.EViT(0.5, (1, 3, 4)), DATA, config, progress=False)
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    with pytest.raises(ValueError, match="keep_warmup applies to EViT and Top-K policies and to losses"):
        train(digits_vit(), fxprune.ToMe(2), DATA, config, progress=False)
