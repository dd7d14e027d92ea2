"""The precisions a training step can run in, and the autocast context that gives each."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


def check_precision(precision: str, owner: str) -> None:
    """ValueError naming the choices unless `precision` is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"{owner}(precision={precision!r}): use 'fp32' or 'bf16' (bfloat16 autocast of "
                         "the forward and losses)")


def autocast(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """bfloat16 autocast on `device` for "bf16"; nothing changes for "fp32"."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")
