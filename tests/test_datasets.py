import numpy as np
import pytest
import torch

from fxprune.tools.datasets import DigitScenes, source_digits


def test_train_and_test_scenes_draw_on_disjoint_source_digits():
    train, _ = source_digits("train")
    test, _ = source_digits("test")
    assert len(train) + len(test) == 1797
    seen = {digit.tobytes() for digit in train}
    assert not any(digit.tobytes() in seen for digit in test)


def test_scenes_are_deterministic_per_seed():
    a, b, c = DigitScenes("test", 5, seed=3), DigitScenes("test", 5, seed=3), DigitScenes("test", 5, seed=4)
    for i in range(5):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert not all(torch.equal(a[i][0], c[i][0]) for i in range(5))


def test_a_scene_is_a_large_rgb_canvas_holding_one_enlarged_digit():
    data = DigitScenes("train", 20, seed=0)
    for i in range(20):
        scene = data.scene(i)
        assert scene.image.shape == (3, 64, 64) and scene.image.dtype == torch.float32
        assert 0.0 <= scene.image.min() and scene.image.max() <= 1.0
        assert 0 <= scene.label <= 9
        top, left, side = scene.box
        assert 28 <= side <= 40 and top + side <= 64 and left + side <= 64
        assert scene.image[:, top : top + side, left : left + side].max() > 0.6  # the digit is drawn bright


def test_most_patches_are_background_or_clutter():
    data = DigitScenes("test", 50, seed=0)
    touched = []
    for i in range(50):
        top, left, side = data.scene(i).box
        rows = (top + side - 1) // 8 - top // 8 + 1
        cols = (left + side - 1) // 8 - left // 8 + 1
        touched.append(rows * cols / 64)  # 8×8 patches that overlap the digit's box
    assert np.mean(touched) < 0.5 and max(touched) <= 36 / 64


def test_labels_cover_every_class():
    labels = [DigitScenes("test", 200, seed=1)[i][1] for i in range(200)]
    assert set(labels) == set(range(10))
    assert np.bincount(labels).min() >= 8


def test_small_canvas_and_unknown_split_are_refused():
    with pytest.raises(ValueError, match="at least 64"):
        DigitScenes("train", 1, size=32)
    with pytest.raises(ValueError, match="split"):
        DigitScenes("valid", 1)


def test_patch_labels_mark_the_digits_ink_inside_its_box_and_the_distractors_outside_it():
    data = DigitScenes("test", 30, seed=1)
    counts = torch.zeros(3, dtype=torch.long)
    for i in range(30):
        scene = data.scene(i)
        top, left, side = scene.box
        assert scene.ink.shape == scene.distractors.shape == (64, 64)
        assert scene.ink.any() and not (scene.ink & scene.distractors).any()
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[top:top + side, left:left + side] = True
        assert not (scene.ink & ~inside).any()  # the digit's ink lies in its box
        assert (scene.image.amax(0)[scene.ink] > 0.15).all()  # and is drawn there
        labels = scene.patch_labels()
        assert labels.shape == (64,)
        share = scene.ink.float().view(8, 8, 8, 8).mean(dim=(1, 3)).flatten()
        assert torch.equal(labels == 1, share >= 1 / 8)
        counts += torch.bincount(labels, minlength=3)
    assert (counts > 0).all() and counts[0] > counts[1]  # background, digit and distractor patches all occur
