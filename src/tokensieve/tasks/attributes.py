"""The fixed vocabulary of the synthetic world: shapes, colours, size classes and purposes.

Every task draws from these tables, and docs/tasks.md quotes them; changing one changes every
task's data, so they are constants, not options.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "ring", "square", "triangle", "star", "cross")

# Saturated, well separated fill colours (RGB in [0, 1]). Background clutter is kept muted
# (chroma <= MAX_CLUTTER_CHROMA), so no clutter pixel can pass for an object colour.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.88, 0.14, 0.12),
    "green": (0.10, 0.72, 0.16),
    "blue": (0.14, 0.30, 0.92),
    "yellow": (0.96, 0.84, 0.08),
    "purple": (0.62, 0.16, 0.86),
    "cyan": (0.08, 0.80, 0.84),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
MAX_CLUTTER_CHROMA = 0.35

# Size classes by the area an unoccluded object covers, as a fraction of the image (low, high).
SIZE_CLASSES: dict[str, tuple[float, float]] = {
    "small": (0.008, 0.016),
    "medium": (0.016, 0.030),
    "large": (0.040, 0.070),
}
# Default mix when a recipe does not choose: mostly small objects.
DEFAULT_SIZE_WEIGHTS: dict[str, float] = {"small": 0.45, "medium": 0.35, "large": 0.20}

PLURALS: dict[str, str] = {
    "circle": "circles", "ring": "rings", "square": "squares",
    "triangle": "triangles", "star": "stars", "cross": "crosses",
}

# Purpose phrases for task-oriented segmentation. "{c}" is replaced by " <colour>" or "".
# A purpose query selects every object whose shape is in the purpose's set (and, with a colour,
# of that colour).
PURPOSES: dict[str, tuple[str, ...]] = {
    "something{c} that rolls": ("circle", "ring"),
    "something{c} to stack": ("square",),
    "a{c} sign that points the way": ("triangle",),
    "something{c} that twinkles in the sky": ("star",),
    "a{c} sign for first aid": ("cross",),
    "something{c} to hang on a hook": ("ring",),
    "something{c} with sharp corners": ("square", "triangle", "star", "cross"),
}

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
