"""A method trained on a reference model, stored as one directory: the fine-tuned model in the
reference layout (`save_reference`, fp16; when the host was frozen, `host.json` names the shipped
reference model it is instead), `method.json` (the method's class and settings) and
`method.safetensors` (the method's own state in fp32: its learned parts and buffers, e.g. SViT's
gates with their calibrated thresholds). Shipped ones live in the package's
`weights/TASK-NAME` (e.g. `weights/seg-svit`) and load with one call: `load_method("seg", "svit")`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from tokensieve.loading import METHODS
from tokensieve.methods import Method
from tokensieve.patch import sieve_of
from tokensieve.reference import store
from tokensieve.reference.patching import image_encoder, patch_reference
from tokensieve.train.identity import method_config, weights_fingerprint, within

METHOD_CONFIG = "method.json"
METHOD_STATE = "method.safetensors"
HOST_RECORD = "host.json"  # a frozen-host run: which shipped model the method was trained on
HOST_PARTS = "host_parts.safetensors"  # the host's parts such a run trained (fp16), if any


def method_name(method: Method) -> str:
    """The name a method goes by on the command line ("svit" for SViT)."""
    for name, cls in METHODS.items():
        if type(method) is cls:
            return name
    raise ValueError(f"{type(method).__name__} is not one of tokensieve's named methods "
                     f"({', '.join(METHODS)}); store it under a directory of your own")


def method_weights(task: str, name: str) -> Path:
    """The package's directory for the `name` method trained on `task`'s reference model."""
    if name not in METHODS:
        raise ValueError(f"no method named {name!r}; choose one of {', '.join(METHODS)}")
    return store.shipped_weights(task).parent / f"{task}-{name}"


def save_method(model: nn.Module, directory: str | os.PathLike, shipped_host: str | None = None,
                trained_parts: Sequence[str] = ()) -> Path:
    """Write a reference model patched with a method (by `patch_reference`): the method's
    settings and state, and the model in fp16 as `save_reference` writes it. With
    `shipped_host=TASK` (a run that left the host frozen) the host is not stored: `host.json`
    names TASK's shipped reference model and the fingerprint of its weights, which `load_method`
    takes and checks; `trained_parts` name the host's modules the run trained all the same (the
    tos model's `sam.mask_decoder` under VLTP's recipe), stored alone in fp16 and left out of the
    fingerprint. The model is not changed."""
    directory = Path(directory)
    sieve = sieve_of(image_encoder(model))
    held = store.stored_files(directory) if directory.is_dir() else []
    if held and not (directory / METHOD_CONFIG).is_file():
        raise ValueError(f"{directory} holds a reference model, not a trained method; store the method in a "
                         "directory of its own")
    (directory / METHOD_CONFIG).unlink(missing_ok=True)  # no complete method here until the last write
    if shipped_host is None:
        store.save_reference(model, directory)
        (directory / HOST_RECORD).unlink(missing_ok=True)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        for name in held:  # an earlier run's fine-tuned host is not this run's
            (directory / name).unlink()
        (directory / HOST_PARTS).unlink(missing_ok=True)
        record = {"task": shipped_host, "weights": weights_fingerprint(model, trained_parts)}
        if trained_parts:
            record["trained_parts"] = list(trained_parts)
            parts = {key: value.detach().half().contiguous() for key, value in model.state_dict().items()
                     if within(key, trained_parts)}
            save_file(parts, directory / HOST_PARTS, metadata={"format": "pt"})
        (directory / HOST_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    state = {key: value.detach().float().contiguous() for key, value in sieve.state_dict().items()}
    save_file(state, directory / METHOD_STATE, metadata={"format": "pt"})
    (directory / METHOD_CONFIG).write_text(json.dumps(method_config(sieve.method), indent=2) + "\n")
    return directory


def stored_method(directory: str | os.PathLike) -> Method:
    """The method whose training `directory` holds, with its settings."""
    path = Path(directory) / METHOD_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {METHOD_CONFIG} in {directory}; pass a directory `tokensieve train TASK "
                                "--method M` wrote")
    config = json.loads(path.read_text())
    kinds = {cls.__name__: cls for cls in METHODS.values()}
    kind = kinds.get(config.pop("class"))
    if kind is None:
        raise ValueError(f"{path} names no method tokensieve knows; it was written by another version")
    return kind(**config)


def shipped_by_name(task: str, name: str) -> Method | None:
    """The method the package ships trained for `task` under `name` (e.g. "svit"), with its stored
    settings; None when it ships none (or `name` is no method's)."""
    if name not in METHODS:
        return None
    directory = method_weights(task, name)
    return stored_method(directory) if (directory / METHOD_CONFIG).is_file() else None


def load_method(task: str, name: str, directory: str | os.PathLike | None = None) -> nn.Module:
    """`task`'s reference model as trained with the `name` method (e.g. "svit"), patched with it
    and in eval mode, from `directory` (default: the package's `weights/TASK-NAME`)."""
    path = Path(directory) if directory is not None else method_weights(task, name)
    if not (path / METHOD_STATE).is_file():
        raise FileNotFoundError(f"no trained {name} for the {task} reference model in {path}; train it with "
                                f"`tokensieve train {task} --method {name}`")
    method = stored_method(path)
    if method_name(method) != name:
        raise ValueError(f"{path} holds {method}, not {name}; load it with load_method({task!r}, "
                         f"{method_name(method)!r}, ...)")
    model = store.load_reference(task, path) if store.holds_reference(path) else _shipped_host(task, path)
    sieve = patch_reference(model, method)
    sieve.load_state_dict(load_file(path / METHOD_STATE))
    return model.eval()


def _shipped_host(task: str, path: Path) -> nn.Module:
    """The shipped reference model a gates-only directory was trained on, checked against its record."""
    if not (path / HOST_RECORD).is_file():
        raise FileNotFoundError(f"{path} holds neither a model nor {HOST_RECORD}; pass a directory "
                                "`tokensieve train TASK --method M` wrote")
    record = json.loads((path / HOST_RECORD).read_text())
    if record["task"] != task:
        raise ValueError(f"{path} was trained on the {record['task']} reference model, not {task}")
    model = store.load_reference(task)
    trained_parts = record.get("trained_parts", [])
    if weights_fingerprint(model, trained_parts) != record["weights"]:
        raise ValueError(f"{path} was trained on other weights of the {task} reference model than the "
                         f"ones installed; retrain: `tokensieve train {task} --method M --freeze-host`")
    if trained_parts:
        parts = load_file(path / HOST_PARTS)
        expected = {key for key in model.state_dict() if within(key, trained_parts)}
        if set(parts) != expected:
            raise ValueError(f"{path / HOST_PARTS} does not hold the {task} model's "
                             f"{', '.join(trained_parts)}; train the method again")
        model.load_state_dict(parts, strict=False)
    return model


def shipped_method(task: str, method: Method) -> Path | None:
    """The package's directory of `method` trained on `task`'s reference model, if one is shipped
    with exactly these settings."""
    try:
        directory = method_weights(task, method_name(method))
    except ValueError:
        return None
    if not (directory / METHOD_STATE).is_file() or not (directory / METHOD_CONFIG).is_file():
        return None
    return directory if stored_method(directory) == method else None
