"""det: detection and instance segmentation of every object, classed by its shape.

Each visible object is one instance: its visible-part mask (what later objects cover is not in
it), the tight box of that mask, and its shape's class, in torchvision's detection format. Class
0 is background (as in torchvision's Mask R-CNN) and class 1 + i is SHAPES[i], whatever the
colour or size: the same classes as seg.
"""

from __future__ import annotations

import numpy as np
import torch

from tokensieve.tasks.attributes import SHAPES
from tokensieve.tasks.scenes import Rendering, Scene, render
from tokensieve.tasks.seg import SegConfig, SegDataset

DET_CLASSES: tuple[str, ...] = ("background", *SHAPES)
DetConfig = SegConfig  # the same scenes, drawn with the same knobs


def instance_targets(scene: Scene, rendering: Rendering) -> dict[str, torch.Tensor]:
    """One image's targets in torchvision's detection format, one row per visible object in
    drawing order: "boxes" float32 [K, 4] (x0, y0, x1, y1 in pixel edges: the box holds pixels
    x0 <= x < x1, y0 <= y < y1), "labels" int64 [K] (1 + SHAPES.index(shape)), "masks" uint8
    [K, H, W]. An object that later objects hide entirely has no row."""
    masks = rendering.masks  # [N, H, W] bool, visible parts
    visible = masks.any(axis=(1, 2))
    masks = masks[visible]
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # [K, H], [K, W]
    boxes = np.stack([cols.argmax(1), rows.argmax(1),
                      cols.shape[1] - cols[:, ::-1].argmax(1), rows.shape[1] - rows[:, ::-1].argmax(1)],
                     axis=1).astype(np.float32).reshape(-1, 4)
    labels = [1 + SHAPES.index(o.shape) for o, seen in zip(scene.objects, visible, strict=True) if seen]
    return {"boxes": torch.from_numpy(boxes),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(masks.astype(np.uint8))}


class DetDataset(SegDataset):
    """Samples {"image": float32 [3, H, W] in [0, 1], "target": instance_targets(...)}, from scenes
    made as seg's are (its own seed and splits). `collate` stacks the images and keeps the targets
    as a list of dicts, which is what torchvision's detection models take:
    `model(list(batch["image"]), batch["target"])`."""

    task = "det"
    num_classes = len(DET_CLASSES)  # background included, as torchvision's detectors count them
    ignore_index = None  # every object is a target; there are no unlabelled pixels

    def sample(self, index: int) -> dict:
        scene = self.scene(index)
        rendering = render(scene)
        return {"image": torch.from_numpy(rendering.image), "target": instance_targets(scene, rendering)}
