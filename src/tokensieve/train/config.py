"""TrainConfig: everything that defines a training run, as one JSON-able dataclass."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass
from typing import Literal

from tokensieve.train.precision import Precision, check_precision

Trained = Literal["method", "model"]
# whole-number fields (steps and epochs apart) and their least value; None: any
_WHOLE_FIELDS: dict[str, int | None] = {"batch_size": 1, "warmup_steps": 0, "seed": None, "num_workers": 0,
                                        "checkpoint_every": 0, "keep_checkpoints": 1, "eval_every": 0}
# real-number fields: (least value, whether it must be exceeded)
_REAL_FIELDS: dict[str, tuple[float, bool]] = {
    "lr": (0.0, False), "model_lr_scale": (0.0, False), "weight_decay": (0.0, False),
    "min_lr_ratio": (0.0, False), "task_weight": (0.0, False), "keep_ratio_weight": (0.0, False),
    "distill_weight": (0.0, False), "distill_temperature": (0.0, True),
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
        """Check every field now, with a message naming the fix, rather than deep inside a run; whole
        numbers and real numbers of any kind (numpy's too) are kept as Python ints and floats."""
        if self.train not in ("method", "model"):
            raise ValueError(f"TrainConfig(train={self.train!r}): use 'method' (the Sieve's parameters "
                             "only) or 'model' (host and method)")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("TrainConfig: give exactly one of steps=... or epochs=...")
        for name in ("steps", "epochs"):
            if getattr(self, name) is not None:
                self._whole(name, minimum=1)
        for name, minimum in _WHOLE_FIELDS.items():
            self._whole(name, minimum)
        if self.steps is not None and self.warmup_steps > self.steps:
            raise ValueError(f"TrainConfig(warmup_steps={self.warmup_steps}): use at most "
                             f"steps={self.steps}; a longer warm-up never reaches lr")
        for name, (lowest, above) in _REAL_FIELDS.items():
            self._real(name, lowest, above)
        if self.min_lr_ratio > 1.0:
            raise ValueError(f"TrainConfig(min_lr_ratio={self.min_lr_ratio}): use a value in [0, 1]")
        if self.grad_clip_norm is not None:
            if not _is_number(self.grad_clip_norm) or not 0 < self.grad_clip_norm < math.inf:
                raise ValueError(f"TrainConfig(grad_clip_norm={self.grad_clip_norm!r}): use a finite value "
                                 "> 0, or None for no clipping")
            object.__setattr__(self, "grad_clip_norm", float(self.grad_clip_norm))
        check_precision(self.precision, "TrainConfig")
        for name in ("resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig({name}={getattr(self, name)!r}): use True or False")
        for name in ("log_path", "checkpoint_dir"):  # Paths become strings, so the config stays JSON
            value = getattr(self, name)
            if value is None:
                continue
            path = os.fspath(value) if isinstance(value, str | os.PathLike) else None
            if not isinstance(path, str) or not path:
                raise ValueError(f"TrainConfig({name}={value!r}): use a path (a str or pathlib.Path), "
                                 "or None")
            object.__setattr__(self, name, path)

    def _whole(self, name: str, minimum: int | None) -> None:
        value = getattr(self, name)
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or (
                minimum is not None and value < minimum):
            floor = f" >= {minimum}" if minimum is not None else ""
            raise ValueError(f"TrainConfig({name}={value!r}): use a whole number{floor} (an int)")
        object.__setattr__(self, name, int(value))

    def _real(self, name: str, lowest: float, above: bool) -> None:
        """A finite number >= lowest (> lowest when `above`)."""
        value = getattr(self, name)
        if not _is_number(value):
            raise ValueError(f"TrainConfig({name}={value!r}): use a number")
        if not math.isfinite(value):
            raise ValueError(f"TrainConfig({name}={value!r}): use a finite number")
        if value < lowest or (above and value == lowest):
            bound = f"{'>' if above else '>='} {lowest:g}"
            raise ValueError(f"TrainConfig({name}={value!r}): use a value {bound}")
        object.__setattr__(self, name, float(value))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls(**json.loads(text))


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
