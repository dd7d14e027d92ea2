"""Checkpoints of a training run: only what was trained, in safetensors, written atomically.

A directory holds `step-00001234.safetensors` files and a `latest` file naming the newest one.
Each checkpoint is written to a hidden temporary file in the same directory, flushed to disk and
renamed over its final name, and only then does `latest` move (the same way), so a crash at any
moment leaves the previous checkpoint whole and `latest` pointing at it. A checkpoint found
truncated, or with a damaged header (a copy cut short, a full disk), is named when read; resuming
then takes the newest one that can be read, with a warning. safetensors keeps no checksum, so
bytes changed inside the tensor data are not noticed.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.optim import Optimizer

import tokensieve
from tokensieve.patch import Sieve, patched_within
from tokensieve.train.atomic import atomic_write
from tokensieve.train.config import TrainConfig
from tokensieve.train.identity import (
    check_same_host,
    check_same_method,
    check_same_trained,
    host_identity,
    method_config,
    method_defaults,
)
from tokensieve.train.rng import rng_from_json, rng_to_json

FORMAT = "tokensieve-train/1"
LATEST = "latest"
_NAME = re.compile(r"step-(\d+)\.safetensors")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.safetensors"


class UnreadableCheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, or with a damaged header (a change inside
    the tensor data goes unnoticed: safetensors keeps no checksum)."""


@dataclass
class RunPosition:
    """Where a run stands after `step` optimiser steps; `rng` holds one state per rank."""

    step: int
    epoch: int
    batch_in_epoch: int
    rng: list[dict[str, Any]]


# ---------------------------------------------------------------- writing


def save_run(directory: str | os.PathLike, *, model: nn.Module, sieve: Sieve | None, config: TrainConfig,
             named_parameters: Sequence[tuple[str, nn.Parameter]], optimizer: Optimizer,
             position: RunPosition, host_weights: str | None) -> Path:
    """Write a checkpoint of the run and point `latest` at it; returns its path."""
    tensors = trained_tensors(model, sieve, config.train)
    tensors.update(_optimizer_tensors(named_parameters, optimizer))
    for rank, state in enumerate(position.rng):
        tensors[f"rng.torch.{rank}"] = state["torch"]
        for device, cuda_state in enumerate(state.get("cuda", [])):
            tensors[f"rng.cuda.{rank}.{device}"] = cuda_state
    metadata = {
        "format": FORMAT,
        "tokensieve_version": tokensieve.__version__,
        "trained": config.train,
        "method": repr(sieve.method) if sieve is not None else "none",
        "method_config": json.dumps(_method_config(sieve)),
        "host": json.dumps(_host_identity(model, sieve)),
        "train_config": config.to_json(),
        "step": str(position.step),
        "epoch": str(position.epoch),
        "batch_in_epoch": str(position.batch_in_epoch),
        "world_size": str(len(position.rng)),
        "rng": json.dumps([rng_to_json(state) for state in position.rng]),
    }
    if host_weights is not None:
        metadata["host_weights"] = host_weights
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / checkpoint_name(position.step)
    # Tensors are copied so that tied or shared storage (which safetensors refuses) is written once each.
    tensors = {key: value.detach().to("cpu", copy=True).contiguous() for key, value in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write(directory / LATEST, lambda tmp: Path(tmp).write_text(path.name + "\n"))
    _remove_old(directory, keep=config.keep_checkpoints, newest=path.name)
    return path


def trained_tensors(model: nn.Module, sieve: Sieve | None, trained: str) -> dict[str, Tensor]:
    """What the run changes: the Sieve's state, plus the host's when the model is trained."""
    state = sieve.state_dict() if sieve is not None else {}
    tensors = {f"sieve.{key}": value for key, value in state.items()}
    if trained == "model":
        tensors.update({f"model.{key}": value for key, value in model.state_dict().items()})
    return tensors


def _optimizer_tensors(named_parameters: Sequence[tuple[str, nn.Parameter]],
                       optimizer: Optimizer) -> dict[str, Tensor]:
    """Each parameter's optimiser state by the parameter's name (robust to reordering)."""
    tensors = {}
    for name, param in named_parameters:
        for field, value in optimizer.state.get(param, {}).items():
            value = value if isinstance(value, Tensor) else torch.tensor(value)
            tensors[f"optimizer.{name}.{field}"] = value
    return tensors


def _remove_old(directory: Path, keep: int, newest: str) -> None:
    steps = sorted(_checkpoint_steps(directory).items())
    for _, name in steps[:-keep]:
        if name != newest:
            (directory / name).unlink(missing_ok=True)


def _checkpoint_steps(directory: Path) -> dict[int, str]:
    found = {}
    for entry in directory.iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            found[int(match.group(1))] = entry.name
    return found


# ---------------------------------------------------------------- reading


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint in `directory` (the one `latest` names), or None if it holds none."""
    candidates = _newest_first(Path(directory))
    return candidates[0] if candidates else None


def finished_steps(directory: str | os.PathLike) -> int:
    """The steps done by the run checkpointed in `directory`: its newest checkpoint's (0 if none)."""
    checkpoint = latest_checkpoint(directory) if Path(directory).is_dir() else None
    return 0 if checkpoint is None else int(read_metadata(checkpoint)["step"])


def resume_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest checkpoint in `directory` that can be read, with a warning naming each newer one
    that cannot; None if the directory holds no checkpoint. Raises UnreadableCheckpointError when
    it holds checkpoints and none can be read."""
    unreadable: list[Path] = []
    for path in _newest_first(Path(directory)):
        try:
            read_metadata(path)
        except UnreadableCheckpointError:
            unreadable.append(path)
            continue
        if unreadable:
            damaged = ", ".join(map(str, unreadable))
            warnings.warn(f"{damaged} cannot be read (truncated or corrupt); resuming from {path}, the "
                          "newest checkpoint that can, so the steps after it are done again", stacklevel=4)
        return path
    if unreadable:
        raise UnreadableCheckpointError(
            f"no checkpoint in {directory} can be read ({', '.join(path.name for path in unreadable)}), "
            "each truncated or corrupt; delete them, or set TrainConfig(resume=False), to start the run over")
    return None


def check_checkpoint_dir(directory: str | os.PathLike) -> None:
    """Refuse a checkpoint directory that is a file, or lies inside one, before any step runs."""
    path = Path(directory)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise ValueError(f"TrainConfig(checkpoint_dir={os.fspath(directory)!r}): {part} is a file, not a "
                             "directory; pass a directory (fit makes it if it is missing)")


def _newest_first(directory: Path) -> list[Path]:
    """The checkpoints of `directory`, newest first: the one `latest` names, then those of earlier
    steps (without a `latest`, or if it names no file, all of them by step)."""
    if not directory.is_dir():
        return []
    steps = _checkpoint_steps(directory)
    order = sorted(steps, reverse=True)
    pointer = directory / LATEST
    if pointer.is_file():
        named = directory / pointer.read_text().strip()
        if named.is_file():
            match = _NAME.fullmatch(named.name)
            earlier = [step for step in order if match is None or step < int(match.group(1))]
            return [named, *(directory / steps[step] for step in earlier)]
    return [directory / steps[step] for step in order]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a checkpoint file, without reading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except SafetensorError as error:
        raise _unreadable(path, error) from error
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tokensieve training checkpoint "
                         f"(format {metadata.get('format')!r}, expected {FORMAT!r})")
    return metadata


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and string metadata of a checkpoint file."""
    metadata = read_metadata(path)
    try:
        return load_file(str(path)), metadata
    except SafetensorError as error:
        raise _unreadable(path, error) from error


def _unreadable(path: str | os.PathLike, error: Exception) -> UnreadableCheckpointError:
    return UnreadableCheckpointError(f"{path} cannot be read: it is truncated or corrupt ({error}). "
                                     "Delete it to use the previous checkpoint of its directory, or pass "
                                     "another one")


def load_run(path: str | os.PathLike, *, model: nn.Module, sieve: Sieve | None, config: TrainConfig,
             named_parameters: Sequence[tuple[str, nn.Parameter]], optimizer: Optimizer,
             host_weights: str | None) -> RunPosition:
    """Restore the trained tensors and the optimiser state of a run; returns where it stood.

    Refuses (ValueError) a checkpoint of another model, method, or choice of what is trained.
    """
    tensors, metadata = read_checkpoint(path)
    where = f"checkpoint {path}"
    check_same_trained(metadata["trained"], config.train, where)
    _check_identity(metadata, model, sieve, where)
    saved_weights = metadata.get("host_weights")
    if saved_weights is not None and host_weights is not None and saved_weights != host_weights:
        raise ValueError(f"{where} trained the method on a host with other weights (fingerprint "
                         f"{saved_weights}, this host's: {host_weights}); resume with the same host weights")
    _load_trained(tensors, model, sieve, config.train)
    _load_optimizer(tensors, named_parameters, optimizer)
    rng_json = json.loads(metadata["rng"])
    rng = []
    for rank, values in enumerate(rng_json):
        state = {"torch": tensors[f"rng.torch.{rank}"], **rng_from_json(values)}
        cuda_keys = [key for key in tensors if key.startswith(f"rng.cuda.{rank}.")]
        cuda = [tensors[key] for key in sorted(cuda_keys, key=lambda k: int(k.rsplit(".", 1)[1]))]
        if cuda:
            state["cuda"] = cuda
        rng.append(state)
    return RunPosition(int(metadata["step"]), int(metadata["epoch"]), int(metadata["batch_in_epoch"]), rng)


def load_trained(model: nn.Module, path: str | os.PathLike, *, sieve: Sieve | None = None) -> dict[str, str]:
    """Load what a training run trained (the method's parameters, and the host's if the model was
    trained) into `model`, patched with the same method (or not patched, for a model trained
    dense); returns the checkpoint's metadata. The patched part may be `model` itself or modules
    inside it patched by one call, as `fit` trains them; `sieve` picks one of several.

    `path` is a checkpoint file or a checkpoint directory (its latest checkpoint).
    """
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise ValueError(f"{path} holds no checkpoint")
        path = found
    if sieve is None:
        _, sieve = patched_within(model)
    tensors, metadata = read_checkpoint(path)
    _check_identity(metadata, model, sieve, f"checkpoint {path}")
    _load_trained(tensors, model, sieve, metadata["trained"])
    return metadata


def _check_identity(metadata: dict[str, str], model: nn.Module, sieve: Sieve | None, where: str) -> None:
    check_same_host(json.loads(metadata["host"]), _host_identity(model, sieve), where)
    defaults = method_defaults(sieve.method) if sieve is not None else None
    ignored = sieve.method.inference_fields if sieve is not None else frozenset()
    check_same_method(json.loads(metadata["method_config"]), _method_config(sieve), where, defaults, ignored)


def _host_identity(model: nn.Module, sieve: Sieve | None) -> dict[str, Any]:
    return host_identity(model, sieve.specs if sieve is not None else None)


def _method_config(sieve: Sieve | None) -> dict[str, Any]:
    """The method's class and fields; {"class": None} for a model trained dense, unpatched."""
    return method_config(sieve.method) if sieve is not None else {"class": None}


def _load_trained(tensors: dict[str, Tensor], model: nn.Module, sieve: Sieve | None, trained: str) -> None:
    if sieve is not None:
        sieve.load_state_dict(_with_prefix(tensors, "sieve."))
    if trained == "model":
        model.load_state_dict(_with_prefix(tensors, "model."))


def _load_optimizer(tensors: dict[str, Tensor], named_parameters: Sequence[tuple[str, nn.Parameter]],
                    optimizer: Optimizer) -> None:
    saved = _with_prefix(tensors, "optimizer.")
    per_parameter: dict[str, dict[str, Tensor]] = {}
    for key, value in saved.items():
        name, field = key.rsplit(".", 1)
        per_parameter.setdefault(name, {})[field] = value
    index_of = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state = {}
    for name, param in named_parameters:
        if name in per_parameter:
            state[index_of[id(param)]] = per_parameter.pop(name)
    if per_parameter:
        raise ValueError(f"the checkpoint has optimiser state for parameters this run does not train: "
                         f"{sorted(per_parameter)[:3]}")
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _with_prefix(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
