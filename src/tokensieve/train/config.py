"""TrainConfig: everything that defines a training run, as one JSON-able dataclass."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Literal

from tokensieve.train.precision import Precision, check_precision

Trained = Literal["method", "model"]


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
        for name in ("log_path", "checkpoint_dir"):  # Paths become strings, so the config stays JSON
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))
        if self.train not in ("method", "model"):
            raise ValueError(f"TrainConfig(train={self.train!r}): use 'method' (the Sieve's parameters "
                             "only) or 'model' (host and method)")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("TrainConfig: give exactly one of steps=... or epochs=...")
        check_precision(self.precision, "TrainConfig")
        for name in ("steps", "epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig({name}={value}): use a positive integer")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig({name}={getattr(self, name)}): use 0 or more")
        if self.keep_checkpoints < 1:
            raise ValueError(f"TrainConfig(keep_checkpoints={self.keep_checkpoints}): keep at least 1")
        if self.model_lr_scale < 0:
            raise ValueError(f"TrainConfig(model_lr_scale={self.model_lr_scale}): use 0 or more")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig(min_lr_ratio={self.min_lr_ratio}): use a value in [0, 1]")
        if self.distill_temperature <= 0:
            raise ValueError(f"TrainConfig(distill_temperature={self.distill_temperature}): use a value > 0")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError(f"TrainConfig(grad_clip_norm={self.grad_clip_norm}): use a value > 0, "
                             "or None for no clipping")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls(**json.loads(text))
