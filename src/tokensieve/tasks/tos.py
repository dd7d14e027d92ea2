"""tos: task-oriented segmentation. An image and a sentence naming the target(s); the answer is
the union of the targets' visible masks.

Sentences come in four families:
- attribute: the one object a description fits ("the red star", "the star", "the red shape");
- every: all objects of a colour or shape ("every green shape", "every circle");
- relation: "the <description> <left of | right of | above | below> the <colour> <shape>", where
  the anchor is the only object of its colour and shape, at least two objects fit the
  description, exactly one of them lies that way, and none is within RELATION_MARGIN of the
  anchor along the axis;
- purpose: every object the PURPOSES table fits, optionally of one colour ("something that
  rolls", "something red with sharp corners").
Every image is used with `queries_per_image` sentences whose targets all differ; dataset index i
is query i % queries_per_image of image i // queries_per_image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from tokensieve.tasks.attributes import DEFAULT_SIZE_WEIGHTS, PURPOSES
from tokensieve.tasks.language import noun_phrase, tokenize
from tokensieve.tasks.relations import RELATIONS, decided, holds
from tokensieve.tasks.scenes import Scene, attribute_map, compose_scene, related_specs, render
from tokensieve.tasks.splits import SyntheticDataset

TOS_FAMILIES: tuple[str, ...] = ("attribute", "every", "relation", "purpose")
SCENE_ATTEMPTS = 20


@dataclass(frozen=True)
class Query:
    family: str
    text: str
    targets: tuple[int, ...]  # indices into scene.objects, ascending


@dataclass(frozen=True)
class TosConfig:
    """Difficulty knobs. Harder: more objects, more attribute sharing (distractors), smaller
    objects, more clutter, family weights towards relation and purpose."""

    objects: tuple[int, int] = (4, 8)
    queries_per_image: int = 4
    share: float = 0.6
    size_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SIZE_WEIGHTS))
    clutter: float = 1.0


def _attribute_queries(scene: Scene) -> list[Query]:
    queries = []
    kinds = {(o.colour, o.shape) for o in scene.objects}
    kinds |= {(o.colour, None) for o in scene.objects} | {(None, o.shape) for o in scene.objects}
    for colour, shape in sorted(kinds, key=str):
        found = scene.indices(colour, shape)
        if len(found) == 1:
            queries.append(Query("attribute", f"the {noun_phrase(colour, shape)}", found))
    return queries


def _every_queries(scene: Scene) -> list[Query]:
    colours = sorted({o.colour for o in scene.objects})
    shapes = sorted({o.shape for o in scene.objects})
    return ([Query("every", f"every {colour} shape", scene.indices(colour=colour)) for colour in colours]
            + [Query("every", f"every {shape}", scene.indices(shape=shape)) for shape in shapes])


def _relation_queries(scene: Scene) -> list[Query]:
    objects = scene.objects
    anchors = [i for i, o in enumerate(objects) if scene.count(o.colour, o.shape) == 1]
    single = {(None, o.shape) for o in objects} | {(o.colour, None) for o in objects}
    descriptions = [(None, None), *sorted(single, key=str)]
    queries = []
    for a in anchors:
        anchor = objects[a]
        for colour, shape in descriptions:
            candidates = [i for i in scene.indices(colour, shape) if i != a]
            if len(candidates) < 2:  # with one candidate the relation would not be needed
                continue
            for relation in RELATIONS:
                if not all(decided(relation, objects[i], anchor, scene.size) for i in candidates):
                    continue
                winners = [i for i in candidates if holds(relation, objects[i], anchor, scene.size)]
                if len(winners) == 1:
                    text = (f"the {noun_phrase(colour, shape)} {relation} "
                            f"the {noun_phrase(anchor.colour, anchor.shape)}")
                    queries.append(Query("relation", text, (winners[0],)))
    return queries


def _purpose_queries(scene: Scene) -> list[Query]:
    queries = []
    for phrase, shapes in PURPOSES.items():
        fits = tuple(i for i, o in enumerate(scene.objects) if o.shape in shapes)
        if not fits:
            continue
        queries.append(Query("purpose", phrase.format(c=""), fits))
        for colour in sorted({scene.objects[i].colour for i in fits}):
            coloured = tuple(i for i in fits if scene.objects[i].colour == colour)
            if coloured != fits:
                queries.append(Query("purpose", phrase.format(c=" " + colour), coloured))
    return queries


def all_queries(scene: Scene) -> dict[str, list[Query]]:
    """Every well-defined query of each family for `scene`."""
    return {"attribute": _attribute_queries(scene), "every": _every_queries(scene),
            "relation": _relation_queries(scene), "purpose": _purpose_queries(scene)}


def choose_queries(rng: np.random.Generator, scene: Scene, count: int) -> list[Query] | None:
    """`count` queries with pairwise different targets, spread over the families in a random
    order; None if the scene does not offer that many different targets."""
    pools = all_queries(scene)
    order = [TOS_FAMILIES[i] for i in rng.permutation(len(TOS_FAMILIES))]
    for family in order:
        pools[family] = [pools[family][i] for i in rng.permutation(len(pools[family]))]
    chosen: list[Query] = []
    used: set[tuple[int, ...]] = set()
    while len(chosen) < count and any(pools.values()):
        for family in order:
            while pools[family]:
                query = pools[family].pop()
                if query.targets not in used:
                    chosen.append(query)
                    used.add(query.targets)
                    break
            if len(chosen) == count:
                break
    return chosen if len(chosen) == count else None


class TosDataset(SyntheticDataset):
    """Samples {"image": float32 [3, H, W] in [0, 1], "text": str, "tokens": int64 [T],
    "mask": bool [H, W], "attributes": uint8 [H, W] (every object's colour×shape class,
    `scenes.attribute_map`: the recipe's auxiliary target), "image_index": int, "family": str}."""

    task = "tos"

    def __init__(self, split: str = "train", size: int | None = None, image_size: int = 224,
                 config: TosConfig | None = None) -> None:
        super().__init__(split, size, image_size)
        self.config = config or TosConfig()

    def image_count(self) -> int:
        return -(-self.length // self.config.queries_per_image)

    def scene(self, image_index: int) -> tuple[Scene, list[Query]]:
        """Image `image_index`'s scene and its queries."""
        rng = self.rng(image_index)
        low, high = self.config.objects
        for _ in range(SCENE_ATTEMPTS):
            specs = related_specs(rng, int(rng.integers(low, high + 1)), self.config.share,
                                  self.config.size_weights)
            scene = compose_scene(rng, specs, self.image_size, self.config.clutter)
            queries = choose_queries(rng, scene, self.config.queries_per_image)
            if queries is not None:
                return scene, queries
        raise RuntimeError(f"no scene with {self.config.queries_per_image} different targets; "
                           "lower queries_per_image or raise the object count")

    def sample(self, index: int) -> dict:
        image_index, query_index = divmod(index, self.config.queries_per_image)
        scene, queries = self.scene(image_index)
        query = queries[query_index]
        rendering = render(scene)
        return {"image": torch.from_numpy(rendering.image), "text": query.text,
                "tokens": tokenize(query.text), "mask": torch.from_numpy(rendering.mask_of(query.targets)),
                "attributes": torch.from_numpy(attribute_map(scene, rendering)),
                "image_index": image_index, "family": query.family}


class TosImages(Dataset):
    """The images of a TosDataset, each with all its sentences: item k is image k rendered once,
    {"image": [3, H, W], "attributes": uint8 [H, W], "texts": [Q sentences], "masks": bool
    [Q, H, W], "families": [Q], "image_index": k}, where Q = queries_per_image and sentence q is
    sample k·Q + q of the dataset. Training on these asks one image several things in one batch,
    so only the sentence tells its targets apart."""

    def __init__(self, queries: TosDataset) -> None:
        self.queries = queries

    def __len__(self) -> int:
        return self.queries.image_count()

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"image {index} out of range for {len(self)} tos images")
        scene, queries = self.queries.scene(int(index))
        rendering = render(scene)
        return {"image": torch.from_numpy(rendering.image),
                "attributes": torch.from_numpy(attribute_map(scene, rendering)),
                "texts": [query.text for query in queries],
                "masks": torch.from_numpy(np.stack([rendering.mask_of(query.targets) for query in queries])),
                "families": [query.family for query in queries], "image_index": int(index)}
