"""Methods named on the command line: read from their `NAME:key=value,...` specs, and fitted to a
model before any work starts. A spec that does not read, or a method that does not fit the model
(a layer past its depth, no class token to score by), is a usage error of the option that gave it."""

from __future__ import annotations

from collections.abc import Callable

import click
from torch import nn

from tokensieve.loading import parse_method
from tokensieve.methods import Method


def read_method(spec: str, hint: str = "METHODS") -> Method:
    """The method `spec` names; a spec that does not read is a usage error of `hint`."""
    try:
        return parse_method(spec)
    except (ValueError, TypeError) as error:
        raise click.BadParameter(str(error), param_hint=hint) from error


def patch_or_refuse(model: nn.Module, method: Method, hint: str = "METHODS",
                    patcher: Callable[[nn.Module, Method], object] | None = None, where: str = "") -> None:
    """Patch `model` with `method` by `patcher` (default: `tokensieve.patch`); a method that does
    not fit the model is a usage error of `hint`, its message led by `where` when given."""
    from tokensieve.patch import patch

    try:
        (patcher or patch)(model, method)
    except (ValueError, TypeError) as error:
        lead = f"{method} on {where}: " if where else ""
        raise click.BadParameter(f"{lead}{error}", param_hint=hint) from error
