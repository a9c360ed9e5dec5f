import runpy
import sys
from pathlib import Path

import torch

from fxprune.tools.models import digits_vit

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "train_digits_vit.py"


def test_training_script_runs_a_few_steps_and_saves_loadable_weights(tmp_path, monkeypatch):
    out = tmp_path / "weights.pt"
    argv = [str(SCRIPT), "--steps", "3", "--pool", "64", "--test", "32", "--batch", "16", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    saved = torch.load(out, weights_only=True)
    assert saved["steps"] == 3 and 0.0 <= saved["test_accuracy"] <= 1.0
    model = digits_vit(pretrained=False)
    model.load_state_dict({k: v.float() for k, v in saved["model"].items()})


def test_standardisation_folds_exactly_into_the_patch_embedding():
    namespace = runpy.run_path(str(SCRIPT))
    model = digits_vit(pretrained=False).double()
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    expected = model((x - 0.07) / 0.13)
    namespace["fold_standardisation"](model, 0.07, 0.13)
    torch.testing.assert_close(model(x), expected)
