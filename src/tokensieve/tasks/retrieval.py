"""retrieval: image-caption pairs for recall@k in both directions.

A caption lists every object in the scene by count, colour and shape, in a random order, and adds
one relation between two objects that are each the only one of their type:
"two red stars , a blue circle and a green square , with the blue circle left of the green square".
Two scenes share a caption only if they hold the same objects and the same relation holds, which
is rare, so recall@1 over a gallery of a thousand is meaningful (tests measure the collisions).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from tokensieve.tasks.attributes import DEFAULT_SIZE_WEIGHTS
from tokensieve.tasks.language import counted, listing, noun_phrase, tokenize
from tokensieve.tasks.relations import RELATIONS, holds
from tokensieve.tasks.scenes import Scene, attribute_map, compose_scene, related_specs, render
from tokensieve.tasks.splits import SyntheticDataset

SCENE_ATTEMPTS = 20


@dataclass(frozen=True)
class RetrievalConfig:
    """Difficulty knobs. Harder: more objects (longer captions, more alike scenes), more attribute
    sharing, smaller objects, more clutter; and a larger gallery at evaluation."""

    objects: tuple[int, int] = (3, 6)
    share: float = 0.5
    size_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SIZE_WEIGHTS))
    clutter: float = 1.0


@dataclass(frozen=True)
class Caption:
    text: str
    inventory: tuple[tuple[str, str, int], ...]  # (colour, shape, count), in the caption's order
    relation: tuple[int, str, int]  # (subject, relation, anchor) as indices into scene.objects


def describe(rng: np.random.Generator, scene: Scene) -> Caption | None:
    """A caption for `scene`, or None when no two unique objects are clearly related."""
    objects = scene.objects
    unique = [i for i, o in enumerate(objects) if scene.count(o.colour, o.shape) == 1]
    related = [(s, r, a) for s in unique for a in unique if s != a for r in RELATIONS
               if holds(r, objects[s], objects[a], scene.size)]
    if not related:
        return None
    subject, relation, anchor = related[int(rng.integers(len(related)))]
    counts = Counter((o.colour, o.shape) for o in objects)
    types = sorted(counts)
    inventory = tuple((*types[i], counts[types[i]]) for i in rng.permutation(len(types)))
    phrases = [counted(n, colour, shape) for colour, shape, n in inventory]
    s, a = objects[subject], objects[anchor]
    text = (f"{listing(phrases)} , with the {noun_phrase(s.colour, s.shape)} {relation} "
            f"the {noun_phrase(a.colour, a.shape)}")
    return Caption(text, inventory, (subject, relation, anchor))


class RetrievalDataset(SyntheticDataset):
    """Samples {"image": float32 [3, H, W] in [0, 1], "text": str, "tokens": int64 [T],
    "attributes": uint8 [H, W] (`scenes.attribute_map`), "image_index": int}; the caption of
    sample i describes image i."""

    task = "retrieval"

    def __init__(self, split: str = "train", size: int | None = None, image_size: int = 224,
                 config: RetrievalConfig | None = None) -> None:
        super().__init__(split, size, image_size)
        self.config = config or RetrievalConfig()

    def scene(self, index: int) -> tuple[Scene, Caption]:
        rng = self.rng(index)
        low, high = self.config.objects
        for _ in range(SCENE_ATTEMPTS):
            specs = related_specs(rng, int(rng.integers(low, high + 1)), self.config.share,
                                  self.config.size_weights)
            scene = compose_scene(rng, specs, self.image_size, self.config.clutter)
            caption = describe(rng, scene)
            if caption is not None:
                return scene, caption
        raise RuntimeError("no scene with two clearly related unique objects; raise the object count")

    def sample(self, index: int) -> dict:
        scene, caption = self.scene(index)
        rendering = render(scene)
        return {"image": torch.from_numpy(rendering.image), "text": caption.text,
                "tokens": tokenize(caption.text),
                "attributes": torch.from_numpy(attribute_map(scene, rendering)), "image_index": index}


def retrieval_gallery(split: str = "test", count: int | None = None, image_size: int = 224,
                      config: RetrievalConfig | None = None) -> tuple[torch.Tensor, list[str]]:
    """The first `count` (default: the split's size) images [N, 3, H, W] and their captions; the
    match of image i is caption i, as `recall_at_k` expects."""
    dataset = RetrievalDataset(split, count, image_size, config)
    samples = [dataset[i] for i in range(len(dataset))]
    return torch.stack([s["image"] for s in samples]), [s["text"] for s in samples]
