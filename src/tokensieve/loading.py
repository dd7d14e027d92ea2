"""Turning command-line words into models and method configs."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import nn

from tokensieve.methods import DynamicViT, EViT, Method, RandomDrop, ToMe, TopK

METHODS: dict[str, type[Method]] = {"topk": TopK, "evit": EViT, "dynamicvit": DynamicViT, "tome": ToMe,
                                    "random": RandomDrop}


def load_model(name: str, checkpoint: str | None = None) -> nn.Module:
    """A transformers model from a local directory, or a timm model by name (random weights, or
    the weights of a local `checkpoint` file). Nothing is downloaded."""
    path = Path(name)
    if path.is_dir():
        return _load_transformers(path)
    import timm

    if not timm.is_model(name):
        raise ValueError(f"{name!r} is neither a transformers model directory nor a timm model name "
                         "(see timm.list_models())")
    return timm.create_model(name, pretrained=False, checkpoint_path=checkpoint or "")


def _load_transformers(path: Path) -> nn.Module:
    import transformers

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json; save the model with save_pretrained()")
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    for name in architectures:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls.from_pretrained(path, local_files_only=True)
    return transformers.AutoModel.from_pretrained(path, local_files_only=True)


def parse_method(spec: str) -> Method:
    """'evit:keep=0.7,fuse=False' -> EViT(keep=0.7, fuse=False).

    Each value is read as a Python literal (a number, a tuple or list, True/False, None; the last
    three in any case), never as a string of characters, and the method then checks and normalises
    it as it does for any caller: a TypeError or ValueError says what to write instead.
    """
    name, _, arguments = spec.partition(":")
    cls = METHODS.get(name.strip().lower())
    if cls is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in _split_top_level(arguments):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or key not in fields:
            raise ValueError(f"{spec!r}: {cls.__name__} takes {', '.join(sorted(fields))} as key=value")
        if key in kwargs:
            raise ValueError(f"{spec!r}: {key} is given twice; give it once")
        kwargs[key] = _value(key, value.strip())
    return cls(**kwargs)


_WORDS = {"true": True, "false": False, "none": None}


def _value(key: str, text: str) -> Any:
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as error:
        raise ValueError(f"cannot read {key}={text}: write a number, True, False, None, or a tuple or list "
                         f"of numbers, e.g. keep=0.7 or layers=(3,6)") from error


def _split_top_level(text: str) -> list[str]:
    """Split at commas that are not inside brackets."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += char in "(["
        depth -= char in ")]"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        items.append(current)
    return [item for item in items if item.strip()]
