"""Reading a method's config fields, once, when the method is made.

The readers every config shares (whole and real numbers, flags, `settle`, `optional`) live in
`tokensieve.fields`, with the rule they follow: a TypeError for a value of the wrong kind, a
ValueError for one of the right kind out of range. Here are the readers only methods need: a share,
a token count, block indices. A method's `__post_init__` calls `settle`; the checks that need the
model (a layer within its depth) run in `bind` through `check_layers`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tokensieve.fields import flag, is_real, is_whole, not_a_string, optional, real, settle, whole

__all__ = ["check_layers", "count", "flag", "layer_indices", "optional", "real", "settle", "share", "whole"]


def share(value: Any, name: str) -> float:
    """A share in (0, 1], as a float: keep, TopK's mass."""
    if not is_real(value):
        raise TypeError(f"{name} is a share: give a number in (0, 1], e.g. {name}=0.7{not_a_string(value)}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} is a share; use a value in (0, 1]")
    return float(value)


def count(value: Any, name: str) -> int:
    """An int >= 0: tokens merged per block."""
    number = whole(value, name)
    if number < 0:
        raise ValueError(f"{name} counts tokens; use {name} >= 0")
    return number


def layer_indices(value: Any, name: str) -> tuple[int, ...]:
    """Block indices, counted from 0, as a sorted tuple without repeats. A list, range or array
    of ints is one; a single int is refused (it reads as well as a count of layers as one layer)."""
    example = f"{name}=(3, 6, 9)"
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # a 0-d array or tensor holds one number, refused below as a single one
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} is a tuple of block indices, and a string is not split into them; write "
                        f"{example}")
    if is_whole(value):
        raise TypeError(f"{name} is a tuple of block indices; for the one block {int(value)}, write "
                        f"{name}=({int(value)},)")
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} is a tuple of block indices, e.g. {example}")
    items = list(value)
    for item in items:
        if not is_whole(item):
            raise TypeError(f"{name} holds block indices, whole numbers counted from 0, and {item!r} is not "
                            f"one; e.g. {example}")
    negative = [int(item) for item in items if item < 0]
    if negative:
        raise ValueError(f"layer indices count blocks from 0, and {negative[0]} is below 0; for the last "
                         f"block of a model of depth D, write D - 1")
    return tuple(sorted({int(item) for item in items}))


def check_layers(layers: Sequence[int], depth: int, name: str) -> tuple[int, ...]:
    """`layers` (already read by `layer_indices`, so none is negative) against a model of `depth`
    blocks."""
    past = [i for i in layers if i >= depth]
    if past:
        raise ValueError(f"{name}(layers={tuple(layers)}): layer {past[0]} is past this model's {depth} "
                         f"blocks; use indices 0..{depth - 1}")
    return tuple(layers)
