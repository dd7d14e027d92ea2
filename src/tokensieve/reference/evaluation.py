"""Score a reference model (dense, or patched with a method) on a split of its task."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from tokensieve.reference.models import IMAGE_SIZE, SegmentationViT
from tokensieve.reference.tos import TosModel
from tokensieve.tasks import (
    SEG_CLASSES,
    accuracy,
    ciou,
    collate,
    confusion_matrix,
    giou,
    intersection_union,
    mean_iou,
)

METRICS = {"cls": "accuracy", "seg": "mIoU", "tos": "gIoU"}  # the headline score of each task


@torch.no_grad()
def evaluate(model: nn.Module, task: str, data: Dataset, batch_size: int = 50,
             progress: bool = True) -> dict[str, float]:
    """{"accuracy": …} for cls, {"mIoU": …} for seg, or {"gIoU": …, "cIoU": …} for tos over all of
    `data`, in eval mode (the model's mode is restored). Scores are accumulated over the whole
    split (tos: each sample's intersection and union), so the batch size never changes them."""
    was_training = model.training
    model.eval()
    try:
        loader = DataLoader(data, batch_size=batch_size, collate_fn=collate)
        batches = tqdm(loader, desc=f"eval {task}", disable=not progress, leave=False)
        if task == "cls":
            pairs = [(_classify(model, batch["image"]), batch["label"]) for batch in batches]
            return {"accuracy": accuracy(torch.cat([p for p, _ in pairs]), torch.cat([t for _, t in pairs]))}
        if task == "seg":
            confusion = sum(confusion_matrix(_segment(model, batch["image"]), batch["mask"], len(SEG_CLASSES))
                            for batch in batches)
            return {"mIoU": mean_iou(confusion)}
        if task == "tos":
            pairs = [intersection_union(_ground(model, batch["image"], batch["text"]), batch["mask"])
                     for batch in batches]
            intersections, unions = torch.cat([i for i, _ in pairs]), torch.cat([u for _, u in pairs])
            return {"gIoU": giou(intersections, unions), "cIoU": ciou(intersections, unions)}
        raise ValueError(f"no reference evaluation for task {task!r}; choose cls, seg or tos")
    finally:
        model.train(was_training)


def _classify(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    interpolate = images.shape[-1] != IMAGE_SIZE
    return model(pixel_values=images, interpolate_pos_encoding=interpolate).logits.argmax(-1)


def _segment(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    if not isinstance(model, SegmentationViT):
        raise TypeError(f"seg evaluation needs a SegmentationViT, got {type(model).__name__}")
    return model.predict(images)


def _ground(model: nn.Module, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    if not isinstance(model, TosModel):
        raise TypeError(f"tos evaluation needs a TosModel, got {type(model).__name__}")
    return model.predict(images, text=texts)
