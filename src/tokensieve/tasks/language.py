"""Sentence pieces shared by the text tasks, and a word-level vocabulary for small text encoders.

Every sentence any task produces is made of VOCABULARY words only (a test checks this), so a
word-level tokeniser never meets an unknown word on this benchmark.
"""

from __future__ import annotations

import re

import torch

from tokensieve.tasks.attributes import COLOUR_NAMES, NUMBER_WORDS, PLURALS, PURPOSES, SHAPES
from tokensieve.tasks.relations import RELATIONS

PAD, UNKNOWN = "<pad>", "<unk>"
_TEMPLATE_WORDS = ("the", "a", "every", "shape", "shapes", "there", "is", "are", "exactly", "no", "more",
                   "than", "and", "with", ",")


def _vocabulary() -> tuple[str, ...]:
    words = set(_TEMPLATE_WORDS) | set(COLOUR_NAMES) | set(SHAPES) | set(PLURALS.values())
    words |= set(NUMBER_WORDS)
    for relation in RELATIONS:
        words |= set(relation.split())
    for purpose in PURPOSES:
        words |= set(purpose.replace("{c}", "").split())
    return (PAD, UNKNOWN, *sorted(words))


VOCABULARY: tuple[str, ...] = _vocabulary()
PAD_ID, UNKNOWN_ID = 0, 1
_INDEX = {word: i for i, word in enumerate(VOCABULARY)}
_WORD = re.compile(r"\w+|[^\w\s]")


def split_words(text: str) -> list[str]:
    """Lower-case words and punctuation marks, in order."""
    return _WORD.findall(text.lower())


def tokenize(text: str) -> torch.Tensor:
    """Word ids [T] (int64) of `text`; words outside VOCABULARY map to UNKNOWN_ID."""
    return torch.tensor([_INDEX.get(w, UNKNOWN_ID) for w in split_words(text)], dtype=torch.long)


def noun_phrase(colour: str | None, shape: str | None) -> str:
    """'red star', 'star', 'red shape' or 'shape'."""
    return f"{colour + ' ' if colour else ''}{shape or 'shape'}"


def counted(count: int, colour: str | None, shape: str | None) -> str:
    """'a red star', 'two red stars', 'three red shapes'."""
    if count == 1:
        return f"a {noun_phrase(colour, shape)}"
    noun = PLURALS[shape] if shape else "shapes"
    return f"{NUMBER_WORDS[count]} {colour + ' ' if colour else ''}{noun}"


def listing(phrases: list[str]) -> str:
    """'x', 'x and y', 'x , y and z'."""
    if len(phrases) == 1:
        return phrases[0]
    return " , ".join(phrases[:-1]) + " and " + phrases[-1]
