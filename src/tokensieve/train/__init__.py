"""Training: fit a method's own parameters, or a whole model, with pruning on.

    >>> from tokensieve.train import TrainConfig, fit, cross_entropy
    >>> ts.patch(model, ts.DynamicViT(keep=0.7))
    >>> fit(model, dataset, cross_entropy, TrainConfig(steps=1000, checkpoint_dir="runs/dvit"))

See docs/training.md.
"""

from tokensieve.train.checkpoint import finished_steps, latest_checkpoint, load_trained, read_checkpoint
from tokensieve.train.config import TrainConfig
from tokensieve.train.log import LOG_FIELDS, StepLog, read_log
from tokensieve.train.loop import FitResult, fit
from tokensieve.train.losses import (
    contrastive_loss,
    cross_entropy,
    distillation_loss,
    keep_ratio_loss,
    keep_ratio_stages,
    logits_of,
    mask_bce_dice,
    pixel_cross_entropy,
)
from tokensieve.train.schedule import WarmupCosine, warmup_cosine

__all__ = [
    "LOG_FIELDS",
    "FitResult",
    "StepLog",
    "TrainConfig",
    "WarmupCosine",
    "contrastive_loss",
    "cross_entropy",
    "distillation_loss",
    "finished_steps",
    "fit",
    "keep_ratio_loss",
    "keep_ratio_stages",
    "latest_checkpoint",
    "load_trained",
    "logits_of",
    "mask_bce_dice",
    "pixel_cross_entropy",
    "read_checkpoint",
    "read_log",
    "warmup_cosine",
]
