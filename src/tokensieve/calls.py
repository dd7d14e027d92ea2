"""Calling a host's sub-modules without the calls that would change nothing.

At batch 1 on a CPU a block spends a visible share of its time in fixed per-call costs, which do
not shrink with the token count. A pruned forward is faster than its host's own only by the work
it removes, so the views skip the sub-modules that are no-ops in the current mode (identities;
dropout and drop-path in eval mode or at rate 0) and, when no gradient is recorded, apply GELU
in place. A sub-module with hooks, or any global module hook, is always called: whoever
registered it sees every call the host's forward would make.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

_DROPOUTS = ("Dropout", "DropPath")  # timm's DropPath, torch's Dropout


def skippable(module: nn.Module) -> bool:
    """Whether calling `module` now returns its input unchanged, with nobody observing the call."""
    if module._forward_hooks or module._forward_pre_hooks or _global_hooks():
        return False
    if type(module) is nn.Identity:
        return True
    if type(module).__name__ in _DROPOUTS:
        rate = getattr(module, "p", getattr(module, "drop_prob", None))
        return rate is not None and (not module.training or rate == 0.0)
    return False


def apply(modules: Sequence[nn.Module], x: Tensor) -> Tensor:
    """`x` through `modules` in order, skipping those that would change nothing."""
    for module in modules:
        if not skippable(module):
            x = module(x)
    return x


def activate(activation: nn.Module, x: Tensor) -> Tensor:
    """`activation(x)`, computed in x's own storage when that is safe: a hookless nn.GELU while no
    gradient is recorded (saves writing a new [tokens, hidden] buffer). `x` must be a fresh
    tensor that no one else reads."""
    if (type(activation) is nn.GELU and not torch.is_grad_enabled() and not activation._forward_hooks
            and not activation._forward_pre_hooks and not _global_hooks()):
        return torch.ops.aten.gelu_(x, approximate=activation.approximate)
    return activation(x)


def _global_hooks() -> bool:
    return bool(getattr(torch_module, "_global_forward_hooks", None)
                or getattr(torch_module, "_global_forward_pre_hooks", None))


__all__ = ["activate", "apply", "skippable"]
