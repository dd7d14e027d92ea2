"""Metrics of the benchmark tasks: pure functions on tensors.

Segmentation scores are accumulated over a whole split (a confusion matrix; per-sample
intersections and unions), then reduced once, so batch size never changes a number.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Fraction of correct answers. `predictions` are class ids [N] or scores [N, C]."""
    if predictions.dim() == labels.dim() + 1:
        predictions = predictions.argmax(-1)
    return (predictions == labels).float().mean().item()


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255
                     ) -> Tensor:
    """[num_classes, num_classes] int64 counts, rows = true class, columns = predicted class.
    Pixels whose label is `ignore_index` are skipped. Sum the matrices of all batches of a split."""
    keep = labels != ignore_index
    pairs = labels[keep].long() * num_classes + predictions[keep].long()
    return torch.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def class_iou(confusion: Tensor) -> Tensor:
    """IoU of each class [C] (float64); NaN for a class absent from both labels and predictions."""
    confusion = confusion.double()
    hits = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - hits
    return torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float("nan")))


def mean_iou(confusion: Tensor, background: int | None = 0) -> float:
    """Mean IoU over classes, from a split's confusion matrix. Background pixels are in the matrix
    (a shape predicted as background is a miss), but class `background` is left out of the mean,
    since its IoU is near 1 on small-object scenes and would hide mistakes; `background=None`
    averages over every class. Classes absent from labels and predictions are skipped."""
    iou = class_iou(confusion)
    if background is not None:
        iou = torch.cat([iou[:background], iou[background + 1:]])
    return torch.nanmean(iou).item()


def intersection_union(predictions: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample intersection and union pixel counts [B] (int64) of bool masks [B, H, W]."""
    predictions, targets = predictions.bool().flatten(1), targets.bool().flatten(1)
    return (predictions & targets).sum(1), (predictions | targets).sum(1)


def giou(intersections: Tensor, unions: Tensor) -> float:
    """gIoU: the mean over samples of each sample's IoU. A sample with an empty prediction and an
    empty target scores 1."""
    per_sample = torch.where(unions > 0, intersections.double() / unions.clamp(min=1).double(),
                             torch.ones_like(unions, dtype=torch.float64))
    return per_sample.mean().item()


def ciou(intersections: Tensor, unions: Tensor) -> float:
    """cIoU: total intersection over total union across samples (large targets weigh more)."""
    total = unions.sum().item()
    return intersections.sum().item() / total if total > 0 else 1.0


def recall_at_k(similarity: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Recall@k both ways from similarity [N_images, N_texts], where text i matches image i.
    A match counts at rank r when r - 1 other candidates score at least as high (ties count
    against the model). Keys: "image_to_text@k", "text_to_image@k"."""
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be square [N, N] with matches on the diagonal, got "
                         f"{tuple(similarity.shape)}")
    matched = similarity.diagonal()
    # the match itself plus every other candidate scoring at least as high
    text_rank = (similarity >= matched[:, None]).sum(1)
    image_rank = (similarity >= matched[None, :]).sum(0)
    result = {}
    for k in ks:
        result[f"image_to_text@{k}"] = (text_rank <= k).double().mean().item()
        result[f"text_to_image@{k}"] = (image_rank <= k).double().mean().item()
    return result
