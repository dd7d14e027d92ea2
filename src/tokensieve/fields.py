"""Reading a config's fields, once, when the config is made: a method's, and TrainConfig's.

Each reader takes what the user gave for one field and returns it in the one type the config works
with (an int, a float, a bool, a name), or refuses it with a message that says what to write:

- a TypeError for a value of the wrong kind (a string or a bool where a number is needed, a float
  where a whole number is);
- a ValueError for a value of the right kind out of range (a negative count, an infinite rate, a
  name that is not among the choices).

Bools are not numbers here, numpy scalars are, and a string is never read as a number. A config's
`__post_init__` calls `settle` with a reader per field.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Reader = Callable[[Any, str], Any]  # (value given, field name) -> normalised value


def settle(config: object, **readers: Reader) -> None:
    """Replace each named field of the frozen dataclass `config` by what its reader makes of it.
    An error is prefixed with the config, the field and the value given: `EViT(keep=True): ...`."""
    for name, read in readers.items():
        given = getattr(config, name)
        try:
            value = read(given, name)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{type(config).__name__}({name}={given!r}): {error}") from None
        object.__setattr__(config, name, value)  # frozen: the dataclass's own setattr refuses


def optional(read: Reader) -> Reader:
    """`read`, letting None through (a setting that is off, or left to the config)."""

    def read_optional(value: Any, name: str) -> Any:
        return None if value is None else read(value, name)

    return read_optional


def whole(value: Any, name: str) -> int:
    """An int (a numpy integer is one; a bool or a float with no fraction is not): a seed."""
    if not is_whole(value):
        raise TypeError(f"{name} is a whole number: give an int{not_a_string(value)}")
    return int(value)


def whole_from(minimum: int) -> Reader:
    """A reader of whole numbers >= `minimum`: a step count (1), a worker count (0)."""

    def read_whole_from(value: Any, name: str) -> int:
        number = whole(value, name)
        if number < minimum:
            raise ValueError(f"use {name} >= {minimum}")
        return number

    return read_whole_from


def real(value: Any, name: str) -> float:
    """A finite number, as a float."""
    if not is_real(value):
        raise TypeError(f"{name} is a number: give an int or a float{not_a_string(value)}")
    if not math.isfinite(value):
        raise ValueError("use a finite number")
    return float(value)


def real_within(low: float, high: float = math.inf, *, low_open: bool = False) -> Reader:
    """A reader of finite numbers in [low, high] ((low, high] when `low_open`): a rate >= 0, a
    temperature > 0."""
    opening = ">" if low_open else ">="
    bounds = f"{opening} {low:g}" if high == math.inf else f"in {'(' if low_open else '['}{low:g}, {high:g}]"

    def read_real_within(value: Any, name: str) -> float:
        number = real(value, name)
        if number < low or (low_open and number == low) or number > high:
            raise ValueError(f"use a value {bounds}")
        return number

    return read_real_within


def flag(value: Any, name: str) -> bool:
    """True or False (a numpy bool is one; 0, 1 and the string 'False' are not)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} is True or False{not_a_string(value)}")
    return bool(value)


def choice(names: Sequence[str], meaning: str = "") -> Reader:
    """A reader of one of `names` (strings); `meaning` says what they choose between."""
    listed = " or ".join(map(repr, names))
    fix = f"use {listed}" + (f" ({meaning})" if meaning else "")

    def read_choice(value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise TypeError(f"{fix}, as a string")
        if value not in names:
            raise ValueError(fix)
        return value

    return read_choice


def is_whole(value: Any) -> bool:
    """An integer of any kind (numpy's too), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number of any kind (numpy's too), but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def not_a_string(value: Any) -> str:
    """The hint for a number given as text (e.g. quoted on the command line)."""
    return ", without quotes" if isinstance(value, str) else ""
