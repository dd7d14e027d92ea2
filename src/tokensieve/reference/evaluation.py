"""Score a reference model (dense, or patched with a method) on a split of its task."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from tokensieve.modes import in_mode
from tokensieve.reference.detection import is_detector
from tokensieve.reference.models import IMAGE_SIZE, SegmentationViT
from tokensieve.reference.tos import TosModel
from tokensieve.reference.vl import image_embeddings, match_logits, text_embeddings, text_inputs
from tokensieve.tasks import (
    SEG_CLASSES,
    accuracy,
    ciou,
    collate,
    confusion_matrix,
    giou,
    intersection_union,
    mean_iou,
    recall_at_k,
)
from tokensieve.tasks.det_metrics import binary_masks, detection_meter, detection_scores

# the headline score of each task; retrieval's is the mean of recall@1 both ways
METRICS = {"cls": "accuracy", "seg": "mIoU", "tos": "gIoU", "nlvr": "accuracy", "retrieval": "R@1",
           "det": "box_ap"}
RECALL_KS = (1, 5)
DET_BATCH = 8  # det images a forward: Mask R-CNN's soft masks are [100, 1, H, W] per image


@torch.no_grad()
def evaluate(model: nn.Module, task: str, data: Dataset, batch_size: int = 50,
             progress: bool = True) -> dict[str, float]:
    """{"accuracy": …} for cls and nlvr, {"mIoU": …} for seg, {"gIoU": …, "cIoU": …} for tos,
    for retrieval {"R@1": …} (the mean of both directions) and recall@1 and @5 each way
    ("image_to_text@1", …), or for det COCO's {"box_ap", "box_ap50", "mask_ap", "mask_ap50"},
    over all of `data`, in eval mode (each sub-module's mode is given back).
    Scores are accumulated over the whole split (tos: each sample's intersection and union;
    retrieval: `data` is the gallery, image i matching caption i as in `retrieval_gallery`), so
    the batch size never changes them."""
    with in_mode(model, training=False):
        return _scores(model, task, data, batch_size, progress)


def _scores(model: nn.Module, task: str, data: Dataset, batch_size: int, progress: bool) -> dict[str, float]:
    if task == "det":
        batch_size = min(batch_size, DET_BATCH)
    loader = DataLoader(data, batch_size=batch_size, collate_fn=collate)
    batches = tqdm(loader, desc=f"eval {task}", disable=not progress, leave=False)
    if task in ("cls", "nlvr"):
        pairs = [(predict(model, task, batch), batch["label"]) for batch in batches]
        return {"accuracy": accuracy(torch.cat([p for p, _ in pairs]), torch.cat([t for _, t in pairs]))}
    if task == "seg":
        confusion = sum(confusion_matrix(predict(model, task, batch), batch["mask"], len(SEG_CLASSES))
                        for batch in batches)
        return {"mIoU": mean_iou(confusion)}
    if task == "tos":
        pairs = [intersection_union(predict(model, task, batch), batch["mask"]) for batch in batches]
        intersections, unions = torch.cat([i for i, _ in pairs]), torch.cat([u for _, u in pairs])
        return {"gIoU": giou(intersections, unions), "cIoU": ciou(intersections, unions)}
    if task == "retrieval":
        pairs = [predict(model, task, batch) for batch in batches]
        return retrieval_scores(torch.cat([i for i, _ in pairs]), torch.cat([t for _, t in pairs]))
    if task == "det":
        meter = detection_meter()
        for batch in batches:
            meter.update(binary_masks(predict(model, task, batch)), binary_masks(batch["target"]))
        return detection_scores(meter)
    raise ValueError(f"no reference evaluation for task {task!r}; choose cls, seg, tos, nlvr, "
                     "retrieval or det")


def predict(model: nn.Module, task: str, batch: dict) -> Any:
    """The task model's prediction on one batch of samples (`collate` of the task's dataset items),
    as scoring runs it: class ids (cls), class maps (seg), masks (tos), match decisions (nlvr),
    (image, text) embeddings (retrieval) or detections (det). Timing a task model times this."""
    if task == "cls":
        return _classify(model, batch["image"])
    if task == "seg":
        return _segment(model, batch["image"])
    if task == "tos":
        return _ground(model, batch["image"], batch["text"])
    if task == "nlvr":
        return _verify(model, batch)
    if task == "retrieval":
        return _embed(model, batch)
    if task == "det":
        return _detect(model, batch["image"])
    raise ValueError(f"no reference model for task {task!r}; choose cls, seg, tos, nlvr, retrieval or det")


def _classify(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    interpolate = images.shape[-1] != IMAGE_SIZE
    return model(pixel_values=images, interpolate_pos_encoding=interpolate).logits.argmax(-1)


def _segment(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    if not isinstance(model, SegmentationViT):
        raise TypeError(f"seg evaluation needs a SegmentationViT, got {type(model).__name__}")
    return model.predict(images)


def _detect(model: nn.Module, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    if not is_detector(model):
        raise TypeError("det evaluation needs the det model (Mask R-CNN on a ViT), got "
                        f"{type(model).__name__}")
    return model(list(images))


def _ground(model: nn.Module, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    if not isinstance(model, TosModel):
        raise TypeError(f"tos evaluation needs a TosModel, got {type(model).__name__}")
    return model.predict(images, text=texts)


def retrieval_scores(images: torch.Tensor, texts: torch.Tensor) -> dict[str, float]:
    """Recall@1 and @5 both ways, and their headline "R@1" (the mean of the two recall@1), from
    normalised embeddings of a gallery: images [N, D], texts [N, D], image i matching text i."""
    scores = recall_at_k(images @ texts.t(), ks=RECALL_KS)
    headline = (scores["image_to_text@1"] + scores["text_to_image@1"]) / 2
    return {"R@1": headline, **scores}


def _verify(model: nn.Module, batch: dict) -> torch.Tensor:
    if not isinstance(model, transformers.BlipForImageTextRetrieval):
        raise TypeError(f"nlvr evaluation needs a BlipForImageTextRetrieval, got {type(model).__name__}")
    input_ids, attention_mask = text_inputs(batch["tokens"], batch["attention_mask"])
    return match_logits(model, batch["image"], input_ids, attention_mask).argmax(-1)


def _embed(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(model, transformers.CLIPModel):
        raise TypeError(f"retrieval evaluation needs a CLIPModel, got {type(model).__name__}")
    input_ids, attention_mask = text_inputs(batch["tokens"], batch["attention_mask"])
    return image_embeddings(model, batch["image"]), text_embeddings(model, input_ids, attention_mask)
