"""The linear probe on patch features that measures restored dense outputs. Budget: about 2 s."""

import pytest
import torch

from fxprune.tools.datasets import DigitScenes
from fxprune.tools.probe import CLASSES, fit_probe, labelled_scenes, mask_scores, patch_features


def test_mask_scores_are_patch_accuracy_and_the_mean_iou_over_the_classes():
    labels = torch.tensor([[0, 0, 1, 1, 2, 2]])
    predicted = torch.tensor([[0, 1, 1, 1, 2, 0]])
    scores = mask_scores(predicted, labels)
    assert scores.accuracy == pytest.approx(100 * 4 / 6)
    assert scores.digit_iou == pytest.approx(100 * 2 / 3)  # digit: 2 patches in both, 3 in either
    assert scores.miou == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)  # background 1 of 3, distractor 1 of 2


def test_a_probe_fitted_on_features_that_separate_the_classes_predicts_them():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, len(CLASSES), (40, 16), generator=generator)
    centres = torch.randn(len(CLASSES), 8, generator=generator) * 3
    features = centres[labels] + 0.1 * torch.randn(40, 16, 8, generator=generator)
    probe = fit_probe(features, labels, steps=200)
    assert torch.equal(probe.predict(features), labels)
    assert probe.predict(features[:1]).shape == (1, 16)


def test_labelled_scenes_pair_each_scene_with_its_patch_classes():
    images, labels = labelled_scenes("test", 3, seed=1)
    data = DigitScenes("test", 3, seed=1)
    assert images.shape == (3, 3, 64, 64) and labels.shape == (3, 64)
    for i in range(3):
        assert torch.equal(images[i], data[i][0]) and torch.equal(labels[i], data.scene(i).patch_labels())


def test_patch_features_leave_the_prefix_rows_out_in_batches():
    model = torch.nn.Identity()
    tokens = torch.randn(5, 4, 2)
    assert torch.equal(patch_features(model, tokens, prefix=1, batch=2), tokens[:, 1:])
