"""Turning command-line words into models and method configs."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from tokensieve.methods import MADTP, VLTP, DynamicViT, EViT, Method, RandomDrop, SViT, ToMe, TopK

METHODS: dict[str, type[Method]] = {"topk": TopK, "evit": EViT, "dynamicvit": DynamicViT, "tome": ToMe,
                                    "random": RandomDrop, "svit": SViT, "vltp": VLTP,
                                    "madtp": MADTP}


def load_model(name: str, checkpoint: str | None = None, image_size: int | None = None) -> nn.Module:
    """A transformers model from a local directory, or a timm model by name: random weights, or the
    weights of a local `checkpoint` file (`load_checkpoint`), built for `image_size` pixels when
    given. A transformers model keeps its config's size (its forward interpolates position
    embeddings, where it does, on request). Nothing is downloaded."""
    if image_size is not None and image_size < 1:
        raise ValueError(f"image size {image_size}: give a side in pixels of at least 1")
    path = Path(name)
    model = _load_transformers(path) if path.is_dir() else _build_timm(name, image_size)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, name)
    return model


def _build_timm(name: str, image_size: int | None) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"{name!r} is neither a transformers model directory nor a timm model name "
                         "(see timm.list_models())")
    size = {} if image_size is None else {"img_size": image_size}
    try:
        model = timm.create_model(name, pretrained=False, **size)
    except TypeError as error:  # a family whose constructor takes no img_size
        raise ValueError(f"timm builds {name} at its own image size only; leave the image size out") \
            from error
    return model


def load_checkpoint(model: nn.Module, checkpoint: str | Path, name: str | None = None) -> None:
    """Load a timm checkpoint file (a state dict saved by torch.save or as safetensors, possibly under
    'state_dict' or 'model') into the timm `model`. A VisionTransformer built for another image size
    gets the checkpoint's position embeddings resampled to its grid, as timm does for its own weights.
    `name` (the model's timm name) is for the error messages."""
    from timm.models import load_state_dict
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    path = Path(checkpoint)
    name = name or type(model).__name__
    if not type(model).__module__.startswith("timm."):
        raise ValueError(f"{path}: a checkpoint file is loaded into a timm model given by name, and {name} "
                         "is not one (a transformers model directory holds its own weights)")
    kind = f"a checkpoint of timm weights (a state dict saved by torch.save or as safetensors) for {name}"
    try:
        state = load_state_dict(str(path))
    except FileNotFoundError as error:
        raise ValueError(f"{path} does not exist; give the path of {kind}") from error
    except Exception as error:  # a file of another kind fails anywhere in the unpickler or the reader
        raise ValueError(f"{path} is not {kind} ({type(error).__name__}); give a file saved from such a "
                         "model") from error
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise ValueError(f"{path} is not {kind}: it holds no tensors by name; give a file saved from such a "
                         "model")
    if isinstance(model, VisionTransformer):
        state = checkpoint_filter_fn(state, model)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # missing, unexpected or misshapen weights
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        first = f" ({details[0][:200]})" if details else ""
        raise ValueError(f"{path} holds the weights of another model than {name}{first}; give a checkpoint "
                         f"of {name}") from error


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
    it as it does for any caller: a TypeError or ValueError says what to write instead. A field that
    takes a name (SViT's gate) also reads a bare word: 'svit:gate=dynamicvit'.
    """
    name, _, arguments = spec.partition(":")
    cls = METHODS.get(name.strip().lower())
    if cls is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in _split_top_level(arguments):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or key not in fields:
            raise ValueError(f"{spec!r}: {cls.__name__} takes {', '.join(sorted(fields))} as key=value")
        if key in kwargs:
            raise ValueError(f"{spec!r}: {key} is given twice; give it once")
        kwargs[key] = _value(key, value.strip(), takes_name=fields[key] in ("str", str))
    return cls(**kwargs)


_WORDS = {"true": True, "false": False, "none": None}


def _value(key: str, text: str, takes_name: bool = False) -> Any:
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    if takes_name and text.isidentifier():  # a name needs no quotes on the command line
        return text
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
