"""Score a reference model (dense, or patched with a method) on a split of its task."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from tokensieve.reference.models import IMAGE_SIZE, SegmentationViT
from tokensieve.tasks import SEG_CLASSES, accuracy, collate, confusion_matrix, mean_iou

METRICS = {"cls": "accuracy", "seg": "mIoU"}


@torch.no_grad()
def evaluate(model: nn.Module, task: str, data: Dataset, batch_size: int = 50,
             progress: bool = True) -> dict[str, float]:
    """{"accuracy": …} for cls or {"mIoU": …} for seg over all of `data`, in eval mode (the model's
    mode is restored). Scores are accumulated over the whole split, so the batch size never
    changes them."""
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
        raise ValueError(f"no reference evaluation for task {task!r}; choose cls or seg")
    finally:
        model.train(was_training)


def _classify(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    interpolate = images.shape[-1] != IMAGE_SIZE
    return model(pixel_values=images, interpolate_pos_encoding=interpolate).logits.argmax(-1)


def _segment(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    if not isinstance(model, SegmentationViT):
        raise TypeError(f"seg evaluation needs a SegmentationViT, got {type(model).__name__}")
    return model.predict(images)
