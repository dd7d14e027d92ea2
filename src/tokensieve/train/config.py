"""TrainConfig: everything that defines a training run, as one JSON-able dataclass."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

from tokensieve.fields import Reader, choice, flag, optional, real_within, settle, whole, whole_from
from tokensieve.train.precision import PRECISIONS, Precision

Trained = Literal["method", "model"]


def _clip_norm(value: Any, name: str) -> float | None:
    """A gradient-norm bound > 0; None turns clipping off (0 is not read as off)."""
    if value is None:
        return None
    try:
        return real_within(0.0, low_open=True)(value, name)
    except ValueError as error:
        raise ValueError(f"{error}, or None for no clipping") from None


def _path(value: Any, name: str) -> str:
    """A non-empty path, as a str (a pathlib.Path becomes one, so the config stays JSON)."""
    if not isinstance(value, str | os.PathLike) or not isinstance(os.fspath(value), str):
        raise TypeError("use a path (a str or pathlib.Path), or None")
    path = os.fspath(value)
    if not path:
        raise ValueError("use a path (a str or pathlib.Path) that is not empty, or None")
    return path


# Every field's reader (tokensieve.fields), in the order they are checked.
_READERS: dict[str, Reader] = {
    "train": choice(("method", "model"), "'method' trains the Sieve's parameters only, 'model' the host "
                                         "and the method"),
    "steps": optional(whole_from(1)),
    "epochs": optional(whole_from(1)),
    "batch_size": whole_from(1),
    "lr": real_within(0.0),
    "model_lr_scale": real_within(0.0),
    "weight_decay": real_within(0.0),
    "warmup_steps": whole_from(0),
    "min_lr_ratio": real_within(0.0, 1.0),
    "grad_clip_norm": _clip_norm,
    "precision": choice(PRECISIONS, "'bf16' runs the forward and losses under bfloat16 autocast"),
    "task_weight": real_within(0.0),
    "keep_ratio_weight": real_within(0.0),
    "distill_weight": real_within(0.0),
    "distill_temperature": real_within(0.0, low_open=True),
    "seed": whole,
    "num_workers": whole_from(0),
    "log_path": optional(_path),
    "checkpoint_dir": optional(_path),
    "checkpoint_every": whole_from(0),
    "keep_checkpoints": whole_from(1),
    "eval_every": whole_from(0),
    "resume": flag,
    "progress": flag,
}


@dataclass(frozen=True)
class TrainConfig:
    """What to train, for how long, with which optimiser, losses, seed and outputs.

    `train="method"` fits only the Sieve's own parameters (DynamicViT's predictors) on a frozen
    host; `train="model"` fine-tunes the host and the method together (the only choice for
    methods without parameters, such as EViT or ToMe). Give `steps` or `epochs`, not both.
    `batch_size` is the global batch (all ranks together) when `fit` batches a Dataset itself.
    `precision="bf16"` runs each step's forward and losses under bfloat16 autocast (weights,
    gradients and optimiser state stay fp32; evaluation runs in fp32): about twice as fast on
    CPUs with native bf16 (AVX512-BF16, AMX), slower on CPUs without it.
    """

    train: Trained = "method"
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 5e-4
    model_lr_scale: float = 1.0  # the host's lr relative to `lr` when train="model"
    weight_decay: float = 0.05  # on matrices only; biases and norms are not decayed
    warmup_steps: int = 0
    min_lr_ratio: float = 0.01  # the cosine ends at lr * min_lr_ratio
    grad_clip_norm: float | None = 1.0
    precision: Precision = "fp32"
    # DynamicViT's defaults: task 1.0, keep-ratio 2.0, distillation 0.5.
    task_weight: float = 1.0
    keep_ratio_weight: float = 2.0
    distill_weight: float = 0.5
    distill_temperature: float = 1.0
    seed: int = 0
    num_workers: int = 0  # DataLoader workers when fit batches a Dataset
    log_path: str | None = None  # JSONL, one line per step (rank 0)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end of the call
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    eval_every: int = 0  # steps between calls of fit's `evaluate`; 0: only at the end
    resume: bool = True  # continue from checkpoint_dir's latest checkpoint when there is one
    progress: bool = True  # a tqdm bar on rank 0

    def __post_init__(self) -> None:
        """Check every field now, with a message naming the fix, rather than deep inside a run: a
        TypeError for a value of the wrong kind, a ValueError for one out of range (the rule of
        tokensieve.fields). Numbers of any kind (numpy's too) are kept as Python ints and floats."""
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("TrainConfig: give exactly one of steps=... or epochs=...")
        settle(self, **_READERS)
        if self.steps is not None and self.warmup_steps > self.steps:
            raise ValueError(f"TrainConfig(warmup_steps={self.warmup_steps}): use at most "
                             f"steps={self.steps}; a longer warm-up never reaches lr")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls(**json.loads(text))

