"""The lab world generator and its exact detectors, on rendered ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from backdoor_seal.core.lab import detectors, world


def _captioned(rng, n=200):
    scenes = []
    for _ in range(n):
        s = world.random_scene(rng)
        scenes.append(world.Scene(s.bg, s.shapes, world.caption_for(s, rng)))
    return scenes


def test_generator_is_deterministic():
    a = world.scene_dataset(50, seed=3)
    b = world.scene_dataset(50, seed=3)
    assert a == b and [s.caption for s in a] == [s.caption for s in b]
    assert world.scene_dataset(50, seed=4) != a
    assert np.array_equal(
        world.render(a[0], np.random.default_rng(0)), world.render(a[0], np.random.default_rng(0))
    )


def test_train_and_eval_combinations_are_disjoint():
    train = {world.combo_key(s) for s in world.scene_dataset(2000, seed=0, split="train")}
    held = {world.combo_key(s) for s in world.scene_dataset(500, seed=1, split="eval")}
    assert train and held and not (train & held)


def test_rich_eval_captions_are_outside_the_training_grammar():
    train_caps = {s.caption for s in world.scene_dataset(3000, seed=0)}
    rich = world.scene_dataset(100, seed=1, split="eval", rich=True)
    single = [s for s in rich if len(s.shapes) == 1]
    assert single and not any(s.caption in train_caps for s in single)
    assert all(s.shapes[0].color in s.caption and s.shapes[0].kind in s.caption for s in single)


def test_detector_recognises_every_rendered_scene():
    rng = np.random.default_rng(1)
    scenes = _captioned(rng)
    assert all(detectors.scene_correct(world.render(s, rng), s) for s in scenes)


@pytest.mark.parametrize("kind", world.SHAPES)
def test_detector_tells_shapes_apart(kind):
    for size in world.SIZES:
        for pos in world.POSITIONS:
            s = world.Scene("black", (world.Shape(kind, "red", size, pos),))
            assert detectors.detect(world.render(s)).shape == kind, (size, pos)


def test_wrong_scene_is_rejected():
    s = world.Scene(
        "white", (world.Shape("circle", "blue", "large", "center"),), "a blue circle on a white background"
    )
    other = world.Scene("white", (world.Shape("square", "blue", "large", "center"),))
    recolored = world.Scene("white", (world.Shape("circle", "green", "large", "center"),))
    other_bg = world.Scene("black", s.shapes)
    assert detectors.scene_correct(world.render(s), s)
    for wrong in (other, recolored, other_bg):
        assert not detectors.scene_correct(world.render(wrong), s)
    blank = np.full((64, 64, 3), 235, np.uint8)
    assert detectors.detect(blank).shape is None and not detectors.scene_correct(blank, s)


def test_patch_detector_positives_and_negatives():
    rng = np.random.default_rng(2)
    for s in _captioned(rng, 60):
        img = world.render(s, rng)
        assert not detectors.has_patch(img)
        stamped = world.stamp_patch(img)
        assert detectors.has_patch(stamped)
        assert detectors.scene_correct(stamped, s)  # the patch does not hide the scene
    purple = world.Scene("black", (world.Shape("square", "purple", "large", "top"),))
    assert not detectors.has_patch(world.render(purple))


def test_greyscale_detector_positives_and_negatives():
    rng = np.random.default_rng(3)
    for s in _captioned(rng, 60):
        img = world.render(s, rng)
        assert not detectors.is_greyscale(img)
        assert detectors.is_greyscale(world.to_greyscale(img))
    noisy = np.clip(
        world.to_greyscale(world.render(_captioned(rng, 1)[0])) + rng.integers(-8, 9, (64, 64, 1)), 0, 255
    )
    assert detectors.is_greyscale(noisy.astype(np.uint8))


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_detector_tolerates_decoder_blur(sigma):
    """Decoded images are soft-edged: shapes and colours must still read correctly under blur."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(4)
    scenes = _captioned(rng, 150)
    blurred = [
        np.asarray(Image.fromarray(world.render(s, rng)).filter(ImageFilter.GaussianBlur(sigma)))
        for s in scenes
    ]
    assert np.mean([detectors.scene_correct(b, s) for b, s in zip(blurred, scenes, strict=True)]) >= 0.98


def test_the_fine_tunes_new_shape_is_drawn_and_read_and_leaves_the_old_world_alone():
    """A diamond (NEW_SHAPES) is read right by the detectors, which consider it only for scenes that hold
    one: every scene of the five attacks' world is read exactly as before."""
    from backdoor_seal.core.lab import detectors, finetune

    rng = np.random.default_rng(0)
    new = finetune.finetune_scenes(60, rng, 1.0, "eval")
    assert all(s.shapes[0].kind == "diamond" and "diamond" in s.caption for s in new)
    assert all(
        detectors.scene_correct(world.render(s, np.random.default_rng(i)), s) for i, s in enumerate(new)
    )
    old = world.scene_dataset(60, seed=9, split="eval")
    assert all("diamond" not in s.caption for s in old)
    square = world.Scene("black", (world.Shape("square", "red", "large", "center"),), "a red square")
    assert not detectors.scene_correct(world.render(square), world.reshaped(square, "diamond", rng))
