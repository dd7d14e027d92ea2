"""Putting a module tree in training or eval mode for a while.

`model.train(flag)` sets every sub-module to one flag, so restoring only `model.training`
afterwards would lose a sub-module the user had set apart (a frozen part in eval mode, say).
`in_mode` records each sub-module's own mode and puts every one back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def in_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """`model` and all its sub-modules in training (True) or eval (False) mode inside the block;
    afterwards, even after an error, each sub-module has the mode it had before."""
    saved = [(module, module.training) for module in model.modules()]
    try:
        model.train(training)
        yield model
    finally:
        for module, was_training in saved:
            module.training = was_training  # the flag alone: `train()` would recurse into children
