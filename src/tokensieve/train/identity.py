"""What a checkpoint belongs to: the host model, the method's config, and what was trained."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import nn

from tokensieve.methods import Method
from tokensieve.spec import ModelSpec

SHORT_HASH = 16  # hex digits kept of a sha256


def host_identity(model: nn.Module, specs: Sequence[ModelSpec] | None) -> dict[str, Any]:
    """Class, the ModelSpec of each patched module (None for a model trained unpatched; one spec
    alone for one module) and a short hash of the parameter names and shapes: equal for two builds
    of the same architecture, different for another model or another size."""
    layout = "\n".join(f"{name}:{tuple(param.shape)}" for name, param in model.named_parameters())
    described = None if specs is None else [dataclasses.asdict(spec) for spec in specs]
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "spec": described[0] if described is not None and len(described) == 1 else described,
        "parameters": hashlib.sha256(layout.encode()).hexdigest()[:SHORT_HASH],
    }


def weights_fingerprint(model: nn.Module, excluding: Sequence[str] = ()) -> str:
    """A short hash of the host's parameter values: a method trained on a frozen host only fits
    that host's weights, so a resumed run checks it is the same host. Parameters under the
    module names `excluding` (parts trained with the method) are left out."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if within(name, excluding):
                continue
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:SHORT_HASH]


def within(name: str, modules: Sequence[str]) -> bool:
    """Whether the parameter or buffer `name` belongs to one of the sub-modules named `modules`."""
    return any(name.startswith(f"{module}.") for module in modules)


def method_config(method: Method) -> dict[str, Any]:
    """The method's class and fields, as JSON values."""
    fields = dataclasses.asdict(method) if dataclasses.is_dataclass(method) else {}
    return {"class": type(method).__name__, **json.loads(json.dumps(fields))}


def check_same_host(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint of another host. Both are compared as JSON values (tuples as lists), a
    saved spec without a field ModelSpec gained since at that field's default."""
    saved, current = _as_json(saved), _as_json(current)
    specs = saved.get("spec")
    for spec in specs if isinstance(specs, list) else [specs] if specs is not None else []:
        for name, default in _SPEC_DEFAULTS.items():
            spec.setdefault(name, default)
    if saved != current:
        raise ValueError(f"{where} was trained on another model: it holds {_describe_host(saved)}, and "
                         f"this model is {_describe_host(current)}. Load it into the model it was "
                         "trained on, or train a new one for this model")


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


_SPEC_DEFAULTS = _as_json({f.name: f.default for f in dataclasses.fields(ModelSpec)
                           if f.default is not dataclasses.MISSING})


def method_defaults(method: Method) -> dict[str, Any]:
    """The method's fields that have a default, at it, as JSON values."""
    if not dataclasses.is_dataclass(method):
        return {}
    defaults = {field.name: field.default for field in dataclasses.fields(method)
                if field.default is not dataclasses.MISSING}
    return json.loads(json.dumps(defaults))


def check_same_method(saved: dict[str, Any], current: dict[str, Any], where: str,
                      defaults: dict[str, Any] | None = None, ignored: Collection[str] = ()) -> None:
    """Refuse a checkpoint of another method. A field the saved config lacks counts as its
    `defaults` value: a field added to a method later keeps its older runs loadable. The `ignored`
    fields (the method's inference-only ones) may differ."""
    if defaults and saved.get("class") == current.get("class"):
        saved = {**{name: value for name, value in defaults.items() if name in current}, **saved}
    if ignored and saved.get("class") == current.get("class"):
        saved = {name: value for name, value in saved.items() if name not in ignored}
        current = {name: value for name, value in current.items() if name not in ignored}
    if saved != current:
        raise ValueError(f"{where} was trained for another method: it holds {_describe_method(saved)}, "
                         f"and this model is patched with {_describe_method(current)}. Patch the model "
                         "with the checkpoint's method, or train a new one")


def check_same_trained(saved: str, current: str, where: str) -> None:
    if saved != current:
        raise ValueError(f"{where} holds a run that trained the {saved}'s parameters, and this run trains "
                         f"the {current}'s; use TrainConfig(train={saved!r}) to resume it, or another "
                         "checkpoint_dir for a new run")


def _describe_host(identity: dict[str, Any]) -> str:
    spec = identity.get("spec")
    if spec is None:
        return f"{identity.get('class')} trained unpatched (parameter layout {identity.get('parameters')})"
    return (f"{identity.get('class')} (depth {spec.get('depth')}, width {spec.get('dim')}, "
            f"{spec.get('input_tokens')} input tokens, parameter layout {identity.get('parameters')})")


def _describe_method(config: dict[str, Any]) -> str:
    if config.get("class") is None:
        return "no method (a model trained unpatched)"
    fields = ", ".join(f"{key}={value!r}" for key, value in config.items() if key != "class")
    return f"{config.get('class')}({fields})"
