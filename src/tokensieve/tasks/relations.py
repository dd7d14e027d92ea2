"""Spatial relations between objects, judged on their centres (CLEVR-style: "left of" compares x
only). A relation is used in a sentence only when it is decided by a clear margin."""

from __future__ import annotations

from tokensieve.tasks.scenes import SceneObject

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION_MARGIN = 0.06  # centres must differ by at least this fraction of the image along the axis


def offset(relation: str, subject: SceneObject, anchor: SceneObject) -> float:
    """How far (pixels) `subject` lies in the direction `relation` from `anchor`; positive when it
    does lie that way (y points down, so "above" means a smaller y)."""
    (sx, sy), (ax, ay) = subject.center, anchor.center
    return {"left of": ax - sx, "right of": sx - ax, "above": ay - sy, "below": sy - ay}[relation]


def holds(relation: str, subject: SceneObject, anchor: SceneObject, size: int) -> bool:
    """True when `subject` is `relation` `anchor` by at least the margin."""
    return offset(relation, subject, anchor) >= RELATION_MARGIN * size


def decided(relation: str, subject: SceneObject, anchor: SceneObject, size: int) -> bool:
    """True when the relation clearly holds or clearly fails (no near-tie along its axis)."""
    return abs(offset(relation, subject, anchor)) >= RELATION_MARGIN * size
