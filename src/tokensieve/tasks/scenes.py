"""Scenes: a cluttered background plus 3-8 coloured shapes, laid out so that every object stays
mostly visible, and rendered to an image with one visible-part mask per object.

A `Scene` is a pure description (object attributes, positions, appearance, background seed), so
rendering it twice gives the same bytes. Task recipes choose *which* objects a scene holds
(`ObjectSpec`s); `compose_scene` chooses where they go.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tokensieve.tasks.attributes import COLOUR_NAMES, COLOURS, SHAPES, SIZE_CLASSES
from tokensieve.tasks.background import render_background
from tokensieve.tasks.shapes import UNIT_AREA, radius_for_area, signed_distance

MIN_VISIBLE = 0.7  # an object keeps at least this fraction of its own area after later objects
PLACEMENT_ATTEMPTS = 60  # positions tried per object before the whole layout starts again
LAYOUT_ATTEMPTS = 50
FILL_JITTER = 0.03  # per-channel colour jitter of an object's fill
BRIGHTNESS = (0.85, 1.05)  # per-object brightness factor
MAX_SHADING = 0.15  # brightness change from an object's centre to its rim, along a random direction


@dataclass(frozen=True)
class ObjectSpec:
    """What an object is; `compose_scene` decides where it goes and how it is shaded."""

    shape: str
    colour: str
    size_class: str


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size_class: str
    center: tuple[float, float]  # (x, y) in pixels, y pointing down
    radius: float  # circumradius in pixels: the object's extent
    rotation: float  # radians
    fill: tuple[float, float, float]  # this object's jittered RGB fill
    shading: tuple[float, float]  # brightness gradient (per circumradius) along x and y

    @property
    def area(self) -> float:
        """Area in pixels when unoccluded."""
        return UNIT_AREA[self.shape] * self.radius**2


@dataclass(frozen=True)
class Scene:
    size: int  # the image is size x size pixels
    objects: tuple[SceneObject, ...]  # in drawing order: later objects lie on top
    background_seed: int
    clutter: float = 1.0

    def indices(self, colour: str | None = None, shape: str | None = None) -> tuple[int, ...]:
        """Objects with the given colour and/or shape (None matches any)."""
        return tuple(i for i, o in enumerate(self.objects)
                     if (colour is None or o.colour == colour) and (shape is None or o.shape == shape))

    def count(self, colour: str | None = None, shape: str | None = None) -> int:
        return len(self.indices(colour, shape))


@dataclass(frozen=True)
class Rendering:
    image: np.ndarray  # [3, H, W] float32 in [0, 1] (not normalised)
    instances: np.ndarray  # [H, W] int16: index of the object visible at each pixel, -1 for background
    n_objects: int

    @property
    def masks(self) -> np.ndarray:
        """Visible-part mask of each object, [n_objects, H, W] bool."""
        return self.instances[None] == np.arange(self.n_objects, dtype=np.int16)[:, None, None]

    def paint(self, values: np.ndarray) -> np.ndarray:
        """[H, W] map of a per-object value: `values[0]` on background, `values[1 + i]` where
        object i is visible."""
        return values[self.instances.astype(np.int64) + 1]  # instance -1 (background) -> 0

    def mask_of(self, objects: Sequence[int]) -> np.ndarray:
        """Union of the visible masks of `objects`, [H, W] bool."""
        return np.isin(self.instances, np.asarray(objects, dtype=np.int16))


# Dense colour×shape classes: 0 background, 1 + COLOUR_NAMES.index(c) · len(SHAPES) + SHAPES.index(s).
ATTRIBUTE_CLASSES = 1 + len(COLOUR_NAMES) * len(SHAPES)


def attribute_class(obj: SceneObject) -> int:
    """The object's colour×shape class, 1 to ATTRIBUTE_CLASSES - 1 (0 is background)."""
    return 1 + COLOUR_NAMES.index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)


def attribute_map(scene: Scene, rendering: Rendering) -> np.ndarray:
    """[H, W] uint8 colour×shape class of the visible object at each pixel (0 on background): the
    dense auxiliary target that keeps an image encoder's map telling colours and shapes apart."""
    classes = [attribute_class(o) for o in scene.objects]
    return rendering.paint(np.asarray([0, *classes], np.uint8))


class PlacementError(RuntimeError):
    """No layout satisfying the recipe was found (too many or too large objects for the image)."""


def _footprint(obj: SceneObject, size: int) -> tuple[slice, slice, np.ndarray, np.ndarray, np.ndarray]:
    """The object's bounding box (rows, cols), pixel offsets from its centre, and signed distance."""
    cx, cy = obj.center
    reach = obj.radius + 1.5
    x0, x1 = max(int(cx - reach), 0), min(math.ceil(cx + reach), size)
    y0, y1 = max(int(cy - reach), 0), min(math.ceil(cy + reach), size)
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - np.float32(cx)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - np.float32(cy)
    distance = signed_distance(obj.shape, dx, dy, obj.radius, obj.rotation)
    return slice(y0, y1), slice(x0, x1), dx, dy, distance


def sample_size_class(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.asarray([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _appearance(rng: np.random.Generator, spec: ObjectSpec, size: int) -> dict:
    low, high = SIZE_CLASSES[spec.size_class]
    area = rng.uniform(low, high) * size * size
    base = np.asarray(COLOURS[spec.colour]) * rng.uniform(*BRIGHTNESS)
    fill = np.clip(base + rng.uniform(-FILL_JITTER, FILL_JITTER, 3), 0.0, 1.0)
    angle = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(0, MAX_SHADING)
    return {
        "radius": radius_for_area(spec.shape, area),
        "rotation": float(rng.uniform(0, 2 * math.pi)),
        "fill": tuple(float(c) for c in fill),
        "shading": (strength * math.cos(angle), strength * math.sin(angle)),
    }


def _try_layout(rng: np.random.Generator, specs: Sequence[ObjectSpec], size: int,
                accept: Callable[[list[SceneObject]], bool] | None) -> list[SceneObject] | None:
    owner = np.full((size, size), -1, np.int16)  # which object is on top at each pixel
    visible = np.zeros(len(specs), np.int64)
    own_area = np.zeros(len(specs), np.int64)
    placed: list[SceneObject] = []
    for i, spec in enumerate(specs):
        look = _appearance(rng, spec, size)
        radius = look["radius"]
        for _ in range(PLACEMENT_ATTEMPTS):
            center = (float(rng.uniform(radius, size - radius)), float(rng.uniform(radius, size - radius)))
            obj = SceneObject(spec.shape, spec.colour, spec.size_class, center, **look)
            rows, cols, _, _, distance = _footprint(obj, size)
            inside = distance <= 0
            under = owner[rows, cols][inside]
            lost = np.bincount(under[under >= 0], minlength=len(specs))
            if np.any(visible - lost < MIN_VISIBLE * own_area):
                continue
            if accept is not None and not accept([*placed, obj]):
                continue
            owner[rows, cols][inside] = i
            visible -= lost
            visible[i] = own_area[i] = int(inside.sum())
            placed.append(obj)
            break
        else:
            return None
    return placed


def compose_scene(rng: np.random.Generator, specs: Sequence[ObjectSpec], size: int = 224,
                  clutter: float = 1.0, accept: Callable[[list[SceneObject]], bool] | None = None) -> Scene:
    """Place `specs` (in drawing order) at random positions inside a `size` x `size` image so that
    every object keeps at least MIN_VISIBLE of its area visible. `accept(placed)` may veto a
    position (it sees the objects placed so far, the candidate last). `clutter` in [0, 1] sets the
    background's texture strength."""
    for _ in range(LAYOUT_ATTEMPTS):
        placed = _try_layout(rng, specs, size, accept)
        if placed is not None:
            seed = int(rng.integers(2**63))
            return Scene(size=size, objects=tuple(placed), background_seed=seed, clutter=clutter)
    raise PlacementError(f"could not place {len(specs)} objects in a {size}x{size} image; use fewer "
                         "or smaller objects")


def render(scene: Scene) -> Rendering:
    """Draw the scene: background, then the objects in order with 1-pixel anti-aliased edges.
    A pixel belongs to an object's mask when the object covers at least half of it and no later
    object does."""
    image = render_background(scene.background_seed, scene.size, scene.clutter)
    instances = np.full((scene.size, scene.size), -1, np.int16)
    for i, obj in enumerate(scene.objects):
        rows, cols, dx, dy, distance = _footprint(obj, scene.size)
        alpha = np.clip(0.5 - distance, 0.0, 1.0)  # coverage of each pixel
        shade = 1.0 + (obj.shading[0] * dx + obj.shading[1] * dy) / obj.radius
        colour = np.clip(np.asarray(obj.fill, np.float32)[:, None, None] * shade, 0.0, 1.0)
        patch = image[:, rows, cols]
        patch += alpha * (colour - patch)
        instances[rows, cols][distance <= 0] = i
    return Rendering(image=image, instances=instances, n_objects=len(scene.objects))


def related_specs(rng: np.random.Generator, count: int, share: float, size_weights: dict[str, float],
                  near: Sequence[tuple[str, str]] = (),
                  allowed: Callable[[str, str], bool] | None = None) -> list[ObjectSpec]:
    """`count` random objects. With probability `share` an object copies the colour or the shape
    of a `near` (colour, shape) type or of an earlier object, so objects that share one attribute
    with another (distractors) are common. `allowed(colour, shape)` excludes types."""
    seen = list(near)
    specs: list[ObjectSpec] = []
    for _ in range(1000 * count):
        if len(specs) == count:
            break
        colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if seen and rng.random() < share:
            like_colour, like_shape = seen[int(rng.integers(len(seen)))]
            if rng.random() < 0.5:
                colour = like_colour
            else:
                shape = like_shape
        if allowed is not None and not allowed(colour, shape):
            continue
        seen.append((colour, shape))
        specs.append(ObjectSpec(shape, colour, sample_size_class(rng, size_weights)))
    if len(specs) < count:
        raise ValueError("`allowed` rejects (almost) every colour and shape; loosen it")
    return specs
