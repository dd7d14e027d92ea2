"""Reading a method's config fields, once, when the method is made.

Each reader takes what the user gave for one field and returns it in the one type the method works
with (a float share, a sorted tuple of int layers, a bool flag), or raises a TypeError (wrong kind)
or ValueError (out of range) that says what to write instead. Bools are not numbers here, numpy
scalars are, and a string is never split into items. A method's `__post_init__` calls `settle`;
the checks that need the model (a layer within its depth) run in `bind` through `check_layers`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

Reader = Callable[[Any, str], Any]  # (value given, field name) -> normalised value


def settle(method: object, **readers: Reader) -> None:
    """Replace each named field of the frozen dataclass `method` by what its reader makes of it.
    An error is prefixed with the method, the field and the value given: `EViT(keep=True): ...`."""
    for name, read in readers.items():
        given = getattr(method, name)
        try:
            value = read(given, name)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{type(method).__name__}({name}={given!r}): {error}") from None
        object.__setattr__(method, name, value)  # frozen: the dataclass's own setattr refuses


def share(value: Any, name: str) -> float:
    """A share in (0, 1], as a float: keep, TopK's mass."""
    if not _is_real(value):
        raise TypeError(f"{name} is a share: give a number in (0, 1], e.g. {name}=0.7{_not_a_string(value)}")
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} is a share; use a value in (0, 1]")
    return float(value)


def whole(value: Any, name: str) -> int:
    """An int (a numpy integer is one; a bool or a float with no fraction is not): a seed."""
    if not _is_whole(value):
        raise TypeError(f"{name} is a whole number, e.g. {name}=0{_not_a_string(value)}")
    return int(value)


def count(value: Any, name: str) -> int:
    """An int >= 0: tokens merged per block."""
    number = whole(value, name)
    if number < 0:
        raise ValueError(f"{name} counts tokens; use {name} >= 0")
    return number


def real(value: Any, name: str) -> float:
    """A finite float."""
    if not _is_real(value) or not math.isfinite(value):
        raise TypeError(f"{name} is a finite number, e.g. {name}=0.5{_not_a_string(value)}")
    return float(value)


def flag(value: Any, name: str) -> bool:
    """True or False (a numpy bool is one; 0, 1 and the string 'False' are not)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} is True or False{_not_a_string(value)}")
    return bool(value)


def layer_indices(value: Any, name: str) -> tuple[int, ...]:
    """Block indices, counted from 0, as a sorted tuple without repeats. A list, range or array
    of ints is one; a single int is refused (it reads as well as a count of layers as one layer)."""
    example = f"{name}=(3, 6, 9)"
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} is a tuple of block indices, and a string is not split into them; write "
                        f"{example}")
    if _is_whole(value):
        raise TypeError(f"{name} is a tuple of block indices; for the one block {int(value)}, write "
                        f"{name}=({int(value)},)")
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} is a tuple of block indices, e.g. {example}")
    items = list(value)
    for item in items:
        if not _is_whole(item):
            raise TypeError(f"{name} holds block indices, whole numbers counted from 0, and {item!r} is not "
                            f"one; e.g. {example}")
    return tuple(sorted({int(item) for item in items}))


def optional(read: Reader) -> Reader:
    """`read`, letting None through (a setting that is off, or left to the method)."""

    def read_optional(value: Any, name: str) -> Any:
        return None if value is None else read(value, name)

    return read_optional


def check_layers(layers: Sequence[int], depth: int, name: str) -> tuple[int, ...]:
    """`layers` (already read by `layer_indices`) against a model of `depth` blocks."""
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"{name}(layers={tuple(layers)}): layer {bad[0]} is past this model's {depth} "
                         f"blocks; use indices 0..{depth - 1}")
    return tuple(layers)


def _is_whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _not_a_string(value: Any) -> str:
    """The hint for a number given as text (e.g. quoted on the command line)."""
    return ", without quotes" if isinstance(value, str) else ""
