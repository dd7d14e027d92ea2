"""Signed distance (in pixels, negative inside) of the six shapes, for rasterising them.

Each shape is sized by its circumradius `radius` (the distance from its centre to its farthest
point), so an object of any shape fits in the disc of that radius. Distances are exact inside and
near the edges, which is all that 1-pixel anti-aliasing needs.
"""

from __future__ import annotations

import math

import numpy as np

RING_INNER = 0.6  # inner radius of a ring, relative to its outer radius
CROSS_ARM_WIDTH = 0.35  # half-width of a cross's arm, relative to its half-length
_STAR_LINE_OFFSET = math.cos(math.radians(72))  # distance of a pentagram's edge lines from its centre
_STAR_INNER = math.cos(math.radians(72)) / math.cos(math.radians(36))  # inner/outer vertex radius


def _cross_area() -> float:
    arm = 1 / math.hypot(1, CROSS_ARM_WIDTH)
    width = CROSS_ARM_WIDTH * arm
    return 8 * arm * width - 4 * width * width


# Area of each shape with circumradius 1; the size of an object is set through these.
UNIT_AREA: dict[str, float] = {
    "circle": math.pi,
    "ring": math.pi * (1 - RING_INNER**2),
    "square": 2.0,
    "triangle": 1.5 * math.sin(2 * math.pi / 3),
    "star": 5 * _STAR_INNER * math.sin(math.radians(36)),
    "cross": _cross_area(),
}


def radius_for_area(shape: str, area: float) -> float:
    """Circumradius (pixels) at which `shape` covers `area` pixels."""
    return math.sqrt(area / UNIT_AREA[shape])


def _line_distances(u: np.ndarray, v: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Projections [..., L] of the points on each unit normal of angle `normals` [L]."""
    cos, sin = np.cos(normals).astype(np.float32), np.sin(normals).astype(np.float32)
    return u[..., None] * cos + v[..., None] * sin


def _regular_polygon(u: np.ndarray, v: np.ndarray, radius: float, sides: int, first_vertex: float
                     ) -> np.ndarray:
    normals = first_vertex + math.pi / sides + 2 * math.pi * np.arange(sides) / sides
    apothem = radius * math.cos(math.pi / sides)
    return _line_distances(u, v, normals).max(-1) - apothem


def _pentagram(u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    # A point is inside the pentagram when it lies on the centre's side of at least four of its
    # five edge lines, so the boundary is where the second-largest line distance crosses zero.
    normals = -math.pi / 2 + 2 * math.pi * np.arange(5) / 5
    lines = _line_distances(u, v, normals)
    return np.partition(lines, 3, axis=-1)[..., 3] - radius * _STAR_LINE_OFFSET


def _cross(u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    arm = radius / math.hypot(1, CROSS_ARM_WIDTH)
    width = CROSS_ARM_WIDTH * arm
    au, av = np.abs(u), np.abs(v)
    return np.minimum(np.maximum(au - arm, av - width), np.maximum(au - width, av - arm))


def signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float, rotation: float
                    ) -> np.ndarray:
    """Signed distance of the points (dx, dy) (pixels from the shape's centre, y down) to the
    boundary of `shape` turned by `rotation` radians. At rotation 0 triangles and stars point up."""
    cos, sin = math.cos(rotation), math.sin(rotation)
    u = dx * cos + dy * sin  # the point in the shape's own frame
    v = dy * cos - dx * sin
    if shape == "circle":
        return np.hypot(u, v) - radius
    if shape == "ring":
        middle = radius * (1 + RING_INNER) / 2
        return np.abs(np.hypot(u, v) - middle) - radius * (1 - RING_INNER) / 2
    if shape == "square":
        return _regular_polygon(u, v, radius, 4, -math.pi / 4)
    if shape == "triangle":
        return _regular_polygon(u, v, radius, 3, -math.pi / 2)
    if shape == "star":
        return _pentagram(u, v, radius)
    if shape == "cross":
        return _cross(u, v, radius)
    raise ValueError(f"unknown shape {shape!r}; choose one of circle, ring, square, triangle, star, cross")
