"""Learning rate: linear warm-up, then a cosine down to a floor."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


@dataclass(frozen=True)
class WarmupCosine:
    """Factor on the base lr at step s (0-based): (s + 1) / warmup during the warm-up, then a half
    cosine from 1 down to `floor`, reached after `total` steps."""

    total: int
    warmup: int = 0
    floor: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, floor: float = 0.0,
                  steps_done: int = 0) -> LambdaLR:
    """A LambdaLR over `optimizer`; `steps_done` > 0 resumes it so that the next lr is the one of
    step `steps_done`, as if the scheduler had been stepped that many times."""
    factor = WarmupCosine(total_steps, warmup_steps, floor)
    if steps_done == 0:
        return LambdaLR(optimizer, factor)
    for group in optimizer.param_groups:  # what LambdaLR records on a fresh start
        group.setdefault("initial_lr", group["lr"])
    return LambdaLR(optimizer, factor, last_epoch=steps_done - 1)
