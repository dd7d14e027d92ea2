"""seg: semantic segmentation of every object by its shape.

Class 0 is background and class 1 + i is SHAPES[i], whatever the colour. Labels hold the visible
part of each object (what is on top wins). Label maps contain no ignored pixels; IGNORE_INDEX is
the value the metrics and losses skip if a user marks pixels themselves (padding, crops).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tokensieve.tasks.attributes import DEFAULT_SIZE_WEIGHTS, SHAPES
from tokensieve.tasks.scenes import Rendering, Scene, compose_scene, related_specs, render
from tokensieve.tasks.splits import SyntheticDataset

SEG_CLASSES: tuple[str, ...] = ("background", *SHAPES)
IGNORE_INDEX = 255


@dataclass(frozen=True)
class SegConfig:
    """Difficulty knobs. Harder: more and smaller objects, more clutter."""

    objects: tuple[int, int] = (3, 8)  # objects per image (inclusive range)
    share: float = 0.5  # chance an object copies one attribute of an earlier one
    size_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SIZE_WEIGHTS))
    clutter: float = 1.0


def label_map(scene: Scene, rendering: Rendering) -> np.ndarray:
    """[H, W] int64 class map: 0 background, 1 + SHAPES.index(shape) on each visible object."""
    return rendering.paint(np.asarray([0] + [1 + SHAPES.index(o.shape) for o in scene.objects], np.int64))


class SegDataset(SyntheticDataset):
    """Samples {"image": float32 [3, H, W] in [0, 1], "mask": int64 [H, W] in range(len(SEG_CLASSES))}."""

    task = "seg"
    num_classes = len(SEG_CLASSES)
    ignore_index = IGNORE_INDEX

    def __init__(self, split: str = "train", size: int | None = None, image_size: int = 224,
                 config: SegConfig | None = None) -> None:
        super().__init__(split, size, image_size)
        self.config = config or SegConfig()

    def scene(self, index: int) -> Scene:
        rng = self.rng(index)
        low, high = self.config.objects
        specs = related_specs(rng, int(rng.integers(low, high + 1)), self.config.share,
                              self.config.size_weights)
        return compose_scene(rng, specs, self.image_size, self.config.clutter)

    def sample(self, index: int) -> dict:
        scene = self.scene(index)
        rendering = render(scene)
        return {"image": torch.from_numpy(rendering.image),
                "mask": torch.from_numpy(label_map(scene, rendering))}
