"""Scenes: deterministic, objects drawn where their masks say, mostly visible, mostly small."""

import math

import numpy as np
import pytest

from tokensieve.tasks.attributes import COLOURS, DEFAULT_SIZE_WEIGHTS, MAX_CLUTTER_CHROMA, SHAPES
from tokensieve.tasks.background import render_background
from tokensieve.tasks.scenes import PlacementError, compose_scene, related_specs, render
from tokensieve.tasks.shapes import UNIT_AREA, signed_distance

PALETTE = np.array(list(COLOURS.values()))  # [6, 3]


def _scene(seed: int, count: int = 8, size: int = 224):
    rng = np.random.default_rng(seed)
    return compose_scene(rng, related_specs(rng, count, 0.5, DEFAULT_SIZE_WEIGHTS), size)


def test_same_seed_gives_the_same_bytes_and_other_seeds_differ():
    first, again, other = render(_scene(1)), render(_scene(1)), render(_scene(2))
    assert first.image.tobytes() == again.image.tobytes()
    assert first.instances.tobytes() == again.instances.tobytes()
    assert first.image.tobytes() != other.image.tobytes()


def test_rendering_is_float32_in_unit_range_with_one_mask_per_object():
    scene = _scene(3, count=6)
    rendering = render(scene)
    assert rendering.image.shape == (3, 224, 224) and rendering.image.dtype == np.float32
    assert rendering.image.min() >= 0 and rendering.image.max() <= 1
    assert rendering.masks.shape == (6, 224, 224) and rendering.masks.dtype == bool
    assert not (rendering.masks.sum(0) > 1).any()  # visible parts never overlap


@pytest.mark.parametrize("shape", SHAPES)
def test_unit_area_matches_the_rasterised_shape(shape):
    radius = 200.0
    coords = np.arange(-210, 210, dtype=np.float32) + 0.5
    inside = signed_distance(shape, coords[None, :], coords[:, None], radius, 0.3) <= 0
    assert inside.sum() == pytest.approx(UNIT_AREA[shape] * radius**2, rel=0.01)
    assert not inside[0].any() and not inside[:, 0].any()  # fits inside its circumradius


def test_object_pixels_carry_their_colour_family():
    for seed in range(10):
        scene = _scene(seed)
        rendering = render(scene)
        for obj, mask in zip(scene.objects, rendering.masks, strict=True):
            mean = rendering.image[:, mask].mean(1)
            nearest = list(COLOURS)[int(np.linalg.norm(PALETTE - mean, axis=1).argmin())]
            assert nearest == obj.colour


def test_masks_lie_where_the_shape_is_and_every_object_stays_mostly_visible():
    for seed in range(10):
        scene = _scene(seed)
        masks = render(scene).masks
        ys, xs = np.mgrid[0:224, 0:224] + 0.5
        for obj, mask in zip(scene.objects, masks, strict=True):
            inside = signed_distance(obj.shape, xs - obj.center[0], ys - obj.center[1], obj.radius,
                                     obj.rotation) <= 0
            assert not (mask & ~inside).any()
            assert mask.sum() >= 0.7 * inside.sum()
            assert inside.sum() == pytest.approx(obj.area, rel=0.1)


def test_objects_stay_inside_the_image_at_either_size():
    for size in (224, 256):
        for obj in _scene(4, size=size).objects:
            x, y = obj.center
            assert obj.radius <= x <= size - obj.radius and obj.radius <= y <= size - obj.radius


def test_most_objects_are_small():
    areas = [mask.mean() for seed in range(30) for mask in render(_scene(seed, count=5)).masks]
    assert max(areas) < 0.10
    assert np.mean(np.array(areas) < 0.03) > 0.6
    assert np.mean(np.array(areas) < 0.016) > 0.3


def test_background_is_muted_so_clutter_never_takes_an_object_colour():
    for seed in range(5):
        image = render_background(seed, 224)
        chroma = image.max(0) - image.min(0)
        assert chroma.max() <= MAX_CLUTTER_CHROMA + 1e-5
    assert min(np.ptp(c) for c in PALETTE) > 1.5 * MAX_CLUTTER_CHROMA  # objects are far more colourful


def test_clutter_knob_changes_texture_and_zero_clutter_is_smooth():
    plain, busy = render_background(7, 224, clutter=0.0), render_background(7, 224, clutter=1.0)
    gradient = lambda im: np.abs(np.diff(im, axis=2)).mean()  # noqa: E731
    assert gradient(plain) < gradient(busy)


def test_too_many_large_objects_raise_a_clear_error():
    rng = np.random.default_rng(0)
    specs = related_specs(rng, 40, 0.0, {"large": 1.0})
    with pytest.raises(PlacementError, match="fewer"):
        compose_scene(rng, specs, 96)


def test_scene_counts_by_attribute():
    scene = _scene(5)
    assert scene.count() == len(scene.objects)
    first = scene.objects[0]
    assert 0 in scene.indices(first.colour, first.shape)
    assert scene.count(colour=first.colour) >= scene.count(first.colour, first.shape) >= 1
    assert math.isclose(sum(scene.count(shape=s) for s in SHAPES), len(scene.objects))
