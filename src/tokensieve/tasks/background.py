"""Cluttered, textured backgrounds: mixed low-frequency colour noise, stripes or grids at a
random angle, and small specks. Every background colour is muted (chroma at most
MAX_CLUTTER_CHROMA), so clutter never takes an object's colour, only its place in the eye.
"""

from __future__ import annotations

import math

import numpy as np

from tokensieve.tasks.attributes import MAX_CLUTTER_CHROMA

PATTERNS = ("none", "stripes", "soft stripes", "grid")
SPECKS_AT_FULL_CLUTTER = (20, 60)  # number of specks (low, high) when clutter == 1
SPECK_RADIUS = (1.0, 4.5)  # pixels at 224x224; scaled with the image


def muted_colours(rng: np.random.Generator, count: int, lightness: tuple[float, float] = (0.25, 0.8)
                  ) -> np.ndarray:
    """`count` random colours [count, 3] whose chroma (max - min channel) is at most
    MAX_CLUTTER_CHROMA."""
    grey = rng.uniform(*lightness, size=(count, 1))
    direction = rng.uniform(-1.0, 1.0, size=(count, 3))
    direction -= direction.mean(axis=1, keepdims=True)
    spread = np.ptp(direction, axis=1, keepdims=True) + 1e-6
    chroma = rng.uniform(0.0, MAX_CLUTTER_CHROMA, size=(count, 1))
    # clipping into [0, 1] can only shrink the spread between channels, so the bound holds
    return np.clip(grey + direction * (chroma / spread), 0.0, 1.0).astype(np.float32)


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly spread a random [3, cells, cells] grid over [3, size, size] cells, by indexing
    rather than a matrix product (no BLAS threads inside data-loader workers)."""
    cells = grid.shape[-1]
    position = (np.arange(size) + 0.5) / size * (cells - 1)
    low = np.minimum(position.astype(int), cells - 2)
    frac = (position - low).astype(np.float32)[:, None]

    def along_rows(values: np.ndarray) -> np.ndarray:  # gathers whole rows: fast
        return values[:, low, :] * (1 - frac) + values[:, low + 1, :] * frac

    # Interpolating the transposed intermediate keeps both gathers on whole rows; the result is
    # the upsampled transpose of `grid`, an equally random grid.
    return along_rows(along_rows(grid).transpose(0, 2, 1))


def _colour_noise(rng: np.random.Generator, size: int, clutter: float) -> np.ndarray:
    """Two layers of random muted colours, 2-4 and 6-12 cells across, mixed on the finer grid and
    then spread over the image in one pass."""
    coarse_cells, fine_cells = int(rng.integers(2, 5)), int(rng.integers(6, 13))
    coarse = muted_colours(rng, coarse_cells**2).T.reshape(3, coarse_cells, coarse_cells)
    fine = muted_colours(rng, fine_cells**2).T.reshape(3, fine_cells, fine_cells)
    coarse = _upsample(coarse, fine_cells)
    return _upsample(coarse + rng.uniform(0.15, 0.5) * clutter * (fine - coarse), size)


def _pattern(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """A [size, size] map in [0, 1] of stripes or grid lines at a random angle."""
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(0.03, 0.10) * size
    duty = rng.uniform(0.12, 0.45)
    coords = np.arange(size, dtype=np.float32) + 0.5
    along = (coords[None, :] * math.cos(angle) + coords[:, None] * math.sin(angle)) / period
    if kind == "soft stripes":
        return 0.5 + 0.5 * np.sin(2 * math.pi * along)
    stripes = (along % 1.0 < duty).astype(np.float32)
    if kind == "stripes":
        return stripes
    across = (coords[None, :] * -math.sin(angle) + coords[:, None] * math.cos(angle)) / period
    return np.maximum(stripes, (across % 1.0 < duty).astype(np.float32))


def _add_specks(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    size = image.shape[-1]
    scale = size / 224
    colours = muted_colours(rng, count, lightness=(0.05, 0.95))
    centres = rng.uniform(0, size, size=(count, 2))
    radii = rng.uniform(*SPECK_RADIUS, size=count) * scale
    squash = rng.uniform(0.4, 1.0, size=count)
    angles = rng.uniform(0, math.pi, size=count)
    for colour, (cx, cy), radius, ratio, angle in zip(colours, centres, radii, squash, angles, strict=True):
        x0, x1 = max(int(cx - radius - 1), 0), min(int(cx + radius + 2), size)
        y0, y1 = max(int(cy - radius - 1), 0), min(int(cy + radius + 2), size)
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = (dy * math.cos(angle) - dx * math.sin(angle)) / ratio
        alpha = np.clip(radius + 0.5 - np.hypot(u, v), 0.0, 1.0)  # [h, w]
        patch = image[:, y0:y1, x0:x1]
        patch += alpha * (colour[:, None, None] - patch)


def render_background(seed: int, size: int, clutter: float = 1.0) -> np.ndarray:
    """Background image [3, size, size] float32 in [0, 1], a pure function of (seed, size, clutter).
    `clutter` in [0, 1] scales the texture contrast and the number of specks (0: plain noise)."""
    rng = np.random.default_rng(seed)
    image = _colour_noise(rng, size, clutter)
    kind = PATTERNS[int(rng.integers(len(PATTERNS)))]
    if kind != "none" and clutter > 0:
        strength = rng.uniform(0.15, 0.45) * clutter * _pattern(rng, size, kind)
        image += strength * (muted_colours(rng, 1)[0][:, None, None] - image)
    low, high = SPECKS_AT_FULL_CLUTTER
    _add_specks(rng, image, round(clutter * rng.integers(low, high + 1)))
    return image.astype(np.float32, copy=False)
