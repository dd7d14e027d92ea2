"""The loss terms of a training step: task, keep ratio, and distillation from the dense model.

Each is a plain function of tensors, so a new method or task reuses them as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tokensieve.tokens import Trace

IGNORE_INDEX = 255  # segmentation label of pixels that count for nothing


def logits_of(output: Any) -> Tensor:
    """The logits of a model's output: a tensor as it is, `.logits` of a transformers output,
    or the first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a {type(output).__name__}; pass fit(..., logits_of=...) "
                    "to say which tensor of the output the losses compare")


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Classification: logits [B, K], class indices [B]."""
    return F.cross_entropy(logits, targets)


def pixel_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Segmentation: logits [B, K, h, w] upsampled to the labels' size, labels [B, H, W]."""
    if logits.shape[-2:] != targets.shape[-2:]:
        logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, targets.long(), ignore_index=ignore_index)


def mask_bce_dice(logits: Tensor, targets: Tensor, bce_weight: float = 2.0, dice_weight: float = 0.5,
                  smooth: float = 1.0) -> Tensor:
    """Binary masks, as LISA trains SAM's decoder: bce_weight · pixel BCE + dice_weight · (1 − Dice).
    Logits [B, 1, h, w] or [B, h, w] are upsampled to the targets [B, H, W] (bool or 0/1); Dice is
    taken per sample on the sigmoid probabilities (so small targets weigh as much as large
    ones), then averaged; `smooth` keeps an empty target from dividing by zero."""
    if logits.dim() == 3:
        logits = logits.unsqueeze(1)
    if logits.dim() != 4 or logits.shape[1] != 1 or targets.dim() != 3:
        raise ValueError(f"mask_bce_dice takes logits [B, 1, h, w] and masks [B, H, W], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    if logits.shape[-2:] != targets.shape[-2:]:
        logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    logits, targets = logits[:, 0].float(), targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    probabilities = logits.sigmoid().flatten(1)
    flat = targets.flatten(1)
    dice = (2 * (probabilities * flat).sum(1) + smooth) / (probabilities.sum(1) + flat.sum(1) + smooth)
    return bce_weight * bce + dice_weight * (1 - dice).mean()


def contrastive_loss(logits: Tensor, targets: Tensor | None = None) -> Tensor:
    """CLIP's symmetric InfoNCE: logits [B images, B texts] (similarities already multiplied by the
    learned scale), image i matching text targets[i] (default: text i); the mean of the
    image→text and text→image cross-entropies."""
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"contrastive_loss takes square logits [B, B] (image i matches text i), got "
                         f"{tuple(logits.shape)}")
    if targets is None:
        targets = torch.arange(logits.shape[0], device=logits.device)
    logits = logits.float()
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def keep_ratio_loss(stages: Sequence[tuple[Tensor, float | Tensor]]) -> Tensor:
    """Mean over stages of the batch mean of (each sample's kept share − target)², as DynamicViT.

    `stages` pairs each stage's keep decisions [B, N] (0/1 carrying gradient, or soft) with its
    target share of tokens kept. The share is taken per sample, so every image meets the budget.
    """
    if not stages:
        raise ValueError("keep_ratio_loss needs at least one (decisions, target) stage")
    per_stage = [(decisions.mean(dim=1) - target).pow(2).mean() for decisions, target in stages]
    return torch.stack(per_stage).mean()


def keep_ratio_stages(traces: Sequence[Trace]) -> list[tuple[Tensor, float]]:
    """(decisions, target) of every keep decision recorded in `traces` (mask-mode forwards) for the
    keep-ratio loss; decisions a method weighs in its own loss (SViT's) are left out."""
    return [(d.decisions, d.target) for trace in traces for d in trace.keep_decisions if d.ratio_loss]


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0,
                      class_dim: int = 1) -> Tensor:
    """KL(teacher ‖ student) of the softened class distributions, times T² (so the gradient scale
    does not depend on T), averaged over samples and positions. Classes lie along dim 1, as for
    F.cross_entropy: [B, K] or [B, K, H, W]."""
    student = student.float().movedim(class_dim, -1)
    teacher = teacher.float().movedim(class_dim, -1)
    student_log = F.log_softmax(student / temperature, dim=-1).flatten(0, -2)
    teacher_log = F.log_softmax(teacher / temperature, dim=-1).flatten(0, -2)
    kl = F.kl_div(student_log, teacher_log, reduction="batchmean", log_target=True)
    return kl * temperature**2
