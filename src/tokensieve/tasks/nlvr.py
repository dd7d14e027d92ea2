"""nlvr: is a statement about the image true or false? (NLVR-style, one image.)

The statement is drawn first, independently of the answer, and then a scene is built to make it
true or false, so the text alone carries no information about the label. Even indices are true,
odd indices false: every split is balanced exactly.

Families (distractors sharing the named colour or shape are added on purpose):
- count: "there is exactly one red circle", "there are exactly two red circles" (1-3 stated;
  a false scene holds 0-3 copies, never the stated number);
- exists: "there is a green triangle" / "there is no green triangle";
- colour: "the star is blue" (exactly one star in the scene; another object often has the colour);
- relation: "the blue square is left of the yellow star" (each named object unique; a false scene
  puts it clearly the other way);
- compare: "there are more red shapes than blue shapes", "there are more circles than squares".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from tokensieve.tasks.attributes import COLOUR_NAMES, DEFAULT_SIZE_WEIGHTS, NUMBER_WORDS, PLURALS, SHAPES
from tokensieve.tasks.language import noun_phrase, tokenize
from tokensieve.tasks.relations import OPPOSITE, RELATIONS, holds
from tokensieve.tasks.scenes import (
    ObjectSpec,
    Rendering,
    Scene,
    SceneObject,
    attribute_map,
    compose_scene,
    related_specs,
    render,
    sample_size_class,
)
from tokensieve.tasks.splits import SyntheticDataset

NLVR_FAMILIES: tuple[str, ...] = ("count", "exists", "colour", "relation", "compare")


@dataclass(frozen=True)
class NlvrConfig:
    """Difficulty knobs. Harder: more objects, more distractors sharing an attribute, smaller
    objects, more clutter, family weights towards count, relation and compare."""

    objects: tuple[int, int] = (3, 8)  # total objects per image (inclusive; raised if a family needs more)
    share: float = 0.7  # chance an extra object shares the colour or shape of a named type
    # counts and existence weigh most: they are what losing a small object's tokens changes
    family_weights: dict[str, float] = field(default_factory=lambda: {**dict.fromkeys(NLVR_FAMILIES, 1.0),
                                                                      "count": 2.0, "exists": 1.5})
    size_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SIZE_WEIGHTS))
    # The size mix of the objects the statement names (small: the answer rests on a few small
    # objects, as cls's does); None: `size_weights`, as the other objects'.
    named_sizes: dict[str, float] | None = field(default_factory=lambda: {"small": 1.0})
    clutter: float = 1.0


# What a statement asks of its scene, as classes: the answers a reader finds in the image before
# judging the statement (for training only: a model that must state them learns to look first).
# count_first / count_second: how many objects of the first / second named kind (4 means 4 or more);
# colour: the colour of the one object of the named shape; x_order / y_order: 1 when the first named
# object's centre lies right of / below the second's. IGNORED where the statement does not ask.
FACTS: dict[str, int] = {"count_first": 5, "count_second": 5, "colour": 6, "x_order": 2, "y_order": 2}
IGNORED = -100  # torch's cross-entropy ignore_index


@dataclass(frozen=True)
class Statement:
    family: str
    text: str
    truth: bool
    # The kinds the statement names, in its order: (colour, shape), None matching any.
    about: tuple[tuple[str | None, str | None], ...] = ()


@dataclass
class _Plan:
    """What a family asks of the scene: the named objects, what other objects must avoid, the
    types distractors should resemble, and an optional veto on placements."""

    text: str
    about: tuple[tuple[str | None, str | None], ...]  # the kinds the text names (Statement.about)
    named: list[tuple[str, str]]  # (colour, shape) of objects that must be in the scene
    avoid: Callable[[str, str], bool]  # True for types the extra objects must not have
    near: list[tuple[str, str]]
    accept: Callable[[list[SceneObject]], bool] | None = None


def _pick(rng: np.random.Generator, options: tuple[str, ...], not_: str | None = None) -> str:
    choices = [o for o in options if o != not_]
    return choices[int(rng.integers(len(choices)))]


def _count(rng: np.random.Generator, truth: bool) -> _Plan:
    colour, shape = _pick(rng, COLOUR_NAMES), _pick(rng, SHAPES)
    stated = int(rng.integers(1, 4))
    actual = stated if truth else int(rng.choice([n for n in range(4) if n != stated]))
    noun = f"{colour} {shape}" if stated == 1 else f"{colour} {PLURALS[shape]}"
    verb = "is" if stated == 1 else "are"
    return _Plan(f"there {verb} exactly {NUMBER_WORDS[stated]} {noun}", ((colour, shape),),
                 [(colour, shape)] * actual, lambda c, s: (c, s) == (colour, shape), [(colour, shape)])


def _exists(rng: np.random.Generator, truth: bool) -> _Plan:
    colour, shape = _pick(rng, COLOUR_NAMES), _pick(rng, SHAPES)
    negated = bool(rng.random() < 0.5)
    present = truth != negated
    copies = int(rng.integers(1, 3)) if present else 0
    text = f"there is {'no' if negated else 'a'} {colour} {shape}"
    return _Plan(text, ((colour, shape),), [(colour, shape)] * copies,
                 lambda c, s: (c, s) == (colour, shape), [(colour, shape)])


def _colour(rng: np.random.Generator, truth: bool) -> _Plan:
    colour, shape = _pick(rng, COLOUR_NAMES), _pick(rng, SHAPES)
    actual = colour if truth else _pick(rng, COLOUR_NAMES, not_=colour)
    named = [(actual, shape)]
    if rng.random() < 0.7:  # the stated colour is often present, on another shape
        named.append((colour, _pick(rng, SHAPES, not_=shape)))
    return _Plan(f"the {shape} is {colour}", ((None, shape),), named, lambda c, s: s == shape,
                 [(colour, shape)])


def _relation(rng: np.random.Generator, truth: bool, size: int) -> _Plan:
    first = (_pick(rng, COLOUR_NAMES), _pick(rng, SHAPES))
    second = first
    while second == first:
        second = (_pick(rng, COLOUR_NAMES), _pick(rng, SHAPES))
    relation = _pick(rng, RELATIONS)
    placed_way = relation if truth else OPPOSITE[relation]

    def accept(placed: list[SceneObject]) -> bool:
        return len(placed) != 2 or holds(placed_way, placed[0], placed[1], size)

    text = f"the {noun_phrase(*first)} is {relation} the {noun_phrase(*second)}"
    return _Plan(text, (first, second), [first, second], lambda c, s: (c, s) in (first, second),
                 [first, second], accept)


def _compare(rng: np.random.Generator, truth: bool) -> _Plan:
    by_colour = bool(rng.random() < 0.5)
    options = COLOUR_NAMES if by_colour else SHAPES
    more = _pick(rng, options)
    fewer = _pick(rng, options, not_=more)
    high, low = sorted(int(n) for n in rng.choice(4, 2, replace=False))[::-1]
    counts = (high, low) if truth else (low, high)
    named = []
    for value, copies in zip((more, fewer), counts, strict=True):
        for _ in range(copies):
            other = _pick(rng, SHAPES if by_colour else COLOUR_NAMES)
            named.append((value, other) if by_colour else (other, value))
    if by_colour:
        text = f"there are more {more} shapes than {fewer} shapes"
        return _Plan(text, ((more, None), (fewer, None)), named, lambda c, s: c in (more, fewer), [])
    text = f"there are more {PLURALS[more]} than {PLURALS[fewer]}"
    return _Plan(text, ((None, more), (None, fewer)), named, lambda c, s: s in (more, fewer), [])


def sample_nlvr(rng: np.random.Generator, truth: bool, config: NlvrConfig, size: int
                ) -> tuple[Scene, Statement]:
    """A statement of a random family, and a scene in which it is `truth`."""
    names = list(config.family_weights)
    weights = np.asarray([config.family_weights[n] for n in names], dtype=float)
    family = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    if family == "relation":
        plan = _relation(rng, truth, size)
    else:
        make = {"count": _count, "exists": _exists, "colour": _colour, "compare": _compare}[family]
        plan = make(rng, truth)
    low, high = config.objects
    total = max(int(rng.integers(low, high + 1)), len(plan.named))
    named_sizes = config.size_weights if config.named_sizes is None else config.named_sizes
    named = [ObjectSpec(shape, colour, sample_size_class(rng, named_sizes))
             for colour, shape in plan.named]
    extra = related_specs(rng, total - len(named), config.share, config.size_weights, near=plan.near,
                          allowed=lambda c, s: not plan.avoid(c, s))
    if plan.accept is None:
        order = rng.permutation(total)
        specs = [(named + extra)[i] for i in order]
    else:  # the two related objects go first, so `accept` can judge them before the rest arrive
        specs = named + [extra[i] for i in rng.permutation(len(extra))]
    scene = compose_scene(rng, specs, size, config.clutter, plan.accept)
    return scene, Statement(family, plan.text, truth, plan.about)


def statement_facts(scene: Scene, statement: Statement) -> np.ndarray:
    """int64 [len(FACTS)]: what `statement` asks of `scene` (FACTS), IGNORED where it asks nothing."""
    facts = dict.fromkeys(FACTS, IGNORED)
    kinds = statement.about
    if statement.family in ("count", "exists", "compare"):
        facts["count_first"] = min(4, scene.count(*kinds[0]))
    if statement.family == "compare":
        facts["count_second"] = min(4, scene.count(*kinds[1]))
    if statement.family == "colour":
        (only,) = scene.indices(*kinds[0])
        facts["colour"] = COLOUR_NAMES.index(scene.objects[only].colour)
    if statement.family == "relation":
        first, second = (scene.objects[scene.indices(*kind)[0]] for kind in kinds)
        facts["x_order"] = int(first.center[0] > second.center[0])
        facts["y_order"] = int(first.center[1] > second.center[1])
    return np.array(list(facts.values()), dtype=np.int64)


class NlvrDataset(SyntheticDataset):
    """Samples {"image": float32 [3, H, W] in [0, 1], "text": str, "tokens": int64 [T],
    "label": int64 [] (1 true, 0 false), "attributes": uint8 [H, W] (`scenes.attribute_map`),
    "facts": int64 [len(FACTS)] (`statement_facts`), "family": str}."""

    task = "nlvr"

    def __init__(self, split: str = "train", size: int | None = None, image_size: int = 224,
                 config: NlvrConfig | None = None) -> None:
        super().__init__(split, size, image_size)
        self.config = config or NlvrConfig()

    def scene(self, index: int) -> tuple[Scene, Statement]:
        return sample_nlvr(self.rng(index), index % 2 == 0, self.config, self.image_size)

    def sample(self, index: int) -> dict:
        scene, statement = self.scene(index)
        return self.sample_of(scene, statement, render(scene))

    def sample_of(self, scene: Scene, statement: Statement, rendering: Rendering) -> dict:
        """The sample of a scene already drawn and rendered (for subclasses that add to it)."""
        return {"image": torch.from_numpy(rendering.image), "text": statement.text,
                "tokens": tokenize(statement.text), "label": torch.tensor(int(statement.truth)),
                "attributes": torch.from_numpy(attribute_map(scene, rendering)),
                "facts": torch.from_numpy(statement_facts(scene, statement)), "family": statement.family}
