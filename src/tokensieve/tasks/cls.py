"""cls: which of K (colour, shape) types is in the image (appears most often, with rivals)?

Each image holds `majority` small copies of the answer type and distractors that share the
answer's colour or shape but are not class types, so the answer depends on binding colour to
shape on one or two small objects in clutter. With `rivals`, other class types appear too, each
fewer times than the answer, and the question becomes which type appears most often (counting,
which a ViT trained from one label per image learns slowly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tokensieve.tasks.attributes import COLOUR_NAMES, SHAPES
from tokensieve.tasks.scenes import ObjectSpec, Scene, compose_scene, render, sample_size_class
from tokensieve.tasks.splits import SyntheticDataset

# The K = 8 class types (colour, shape). Pairs share a colour or a shape, and purple and cyan only
# ever appear on distractors.
CLS_TYPES: tuple[tuple[str, str], ...] = (
    ("red", "circle"), ("red", "triangle"), ("green", "square"), ("green", "star"),
    ("blue", "circle"), ("blue", "cross"), ("yellow", "triangle"), ("yellow", "ring"),
)
CLS_CLASSES: tuple[str, ...] = tuple(f"{colour} {shape}" for colour, shape in CLS_TYPES)


@dataclass(frozen=True)
class ClsConfig:
    """Difficulty knobs. Harder: more distractors, rivals (a counting question), a majority of 1,
    more clutter."""

    majority: tuple[int, int] = (1, 2)  # copies of the answer type (inclusive range)
    rivals: tuple[int, int] = (0, 0)  # other class types present, each fewer times than the answer
    distractors: tuple[int, int] = (2, 5)  # non-class objects sharing the answer's colour or shape
    max_objects: int = 8  # rivals, then distractors, are cut back to respect this
    class_sizes: dict[str, float] = field(default_factory=lambda: {"small": 1.0})
    distractor_sizes: dict[str, float] = field(
        default_factory=lambda: {"small": 0.35, "medium": 0.35, "large": 0.3})
    clutter: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.majority[0] <= self.majority[1] <= self.max_objects:
            raise ValueError(f"majority {self.majority} must be a range within 1..max_objects "
                             f"({self.max_objects})")


def _distractor_types(answer: tuple[str, str]) -> list[tuple[str, str]]:
    """Types outside the class set that share the answer's colour or shape."""
    colour, shape = answer
    same_colour = [(colour, s) for s in SHAPES if s != shape]
    same_shape = [(c, shape) for c in COLOUR_NAMES if c != colour]
    return [t for t in same_colour + same_shape if t not in CLS_TYPES]


def sample_cls_scene(rng: np.random.Generator, config: ClsConfig, size: int) -> tuple[Scene, int]:
    """A scene and its label (index into CLS_TYPES); the label's type is the unique most frequent."""
    label = int(rng.integers(len(CLS_TYPES)))
    answer = CLS_TYPES[label]
    majority = int(rng.integers(config.majority[0], config.majority[1] + 1))
    others = [t for t in CLS_TYPES if t != answer]
    rival_count = min(int(rng.integers(config.rivals[0], config.rivals[1] + 1)), len(others))
    rivals = [others[i] for i in rng.choice(len(others), rival_count, replace=False)]
    rival_copies = [int(rng.integers(1, majority)) for _ in rivals]  # always below the majority
    choices = _distractor_types(answer)
    distractors = [choices[int(rng.integers(len(choices)))]
                   for _ in range(int(rng.integers(config.distractors[0], config.distractors[1] + 1)))]

    # keep within max_objects: drop distractors first, then rival copies
    while majority + sum(rival_copies) + len(distractors) > config.max_objects:
        if distractors:
            distractors.pop()
        else:
            rival_copies[-1] -= 1
            if rival_copies[-1] == 0:
                rival_copies.pop()
                rivals.pop()

    def specs(types: list[tuple[str, str]], weights: dict[str, float]) -> list[ObjectSpec]:
        return [ObjectSpec(shape, colour, sample_size_class(rng, weights)) for colour, shape in types]

    rival_types = [t for t, copies in zip(rivals, rival_copies, strict=True) for _ in range(copies)]
    class_types = [answer] * majority + rival_types
    objects = specs(class_types, config.class_sizes) + specs(distractors, config.distractor_sizes)
    order = rng.permutation(len(objects))
    scene = compose_scene(rng, [objects[i] for i in order], size, config.clutter)
    return scene, label


class ClsDataset(SyntheticDataset):
    """Samples {"image": float32 [3, H, W] in [0, 1], "label": int64 []} with label in
    range(len(CLS_TYPES))."""

    task = "cls"
    num_classes = len(CLS_TYPES)

    def __init__(self, split: str = "train", size: int | None = None, image_size: int = 224,
                 config: ClsConfig | None = None) -> None:
        super().__init__(split, size, image_size)
        self.config = config or ClsConfig()

    def scene(self, index: int) -> tuple[Scene, int]:
        return sample_cls_scene(self.rng(index), self.config, self.image_size)

    def sample(self, index: int) -> dict:
        scene, label = self.scene(index)
        return {"image": torch.from_numpy(render(scene).image), "label": torch.tensor(label)}
