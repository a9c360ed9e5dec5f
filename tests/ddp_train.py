"""Run by tests/test_train.py under torchrun: a few training steps with each policy given, each rank writing its
final weights (``rank<r>_<i>.pt`` for the ``i``-th policy)."""

import sys

import torch

import fxprune
from fxprune.tools.datasets import DigitScenes
from fxprune.tools.models import digits_vit
from fxprune.tools.train import TrainConfig, train

if __name__ == "__main__":
    out, policies = sys.argv[1], [fxprune.parse_policy(text) for text in sys.argv[2:]]
    config = TrainConfig(steps=3, batch_size=8, warmup=1, lr=1e-3)
    for i, policy in enumerate(policies):
        result = train(digits_vit(), policy, DigitScenes("train", 64, seed=0), config, progress=False)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        torch.save({"state": result.model.state_dict(), "losses": result.losses}, f"{out}/rank{rank}_{i}.pt")
