"""COCO-style box and mask AP of the det task, computed by torchmetrics' MeanAveragePrecision
with the faster_coco_eval backend (the COCO evaluation protocol, not a reimplementation).

Predictions and targets are torchvision's detection dicts. Accumulate a split with
`detection_meter()` and `meter.update(predictions, targets)` per batch (masks are stored
run-length encoded, so a split fits in memory), then `detection_scores(meter)`; or call
`detection_ap(predictions, targets)` on whole lists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from torchmetrics.detection import MeanAveragePrecision

MASK_THRESHOLD = 0.5  # soft mask probabilities (Mask R-CNN's output) count as inside above this
# our keys -> torchmetrics' keys: AP averaged over IoU 0.5:0.05:0.95, and AP at IoU 0.5
_KEYS = {"box_ap": "bbox_map", "box_ap50": "bbox_map_50", "mask_ap": "segm_map", "mask_ap50": "segm_map_50"}


def detection_meter() -> MeanAveragePrecision:
    """An empty accumulator of box and mask AP; feed it `binary_masks`-ed predictions."""
    # imported here: torchmetrics takes seconds to import and only evaluation needs it
    from torchmetrics.detection import MeanAveragePrecision
    return MeanAveragePrecision(iou_type=("bbox", "segm"), backend="faster_coco_eval")


def binary_masks(detections: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """The same dicts with "masks" as bool [K, H, W]: uint8 targets, and Mask R-CNN's soft masks
    [K, 1, H, W] thresholded at MASK_THRESHOLD."""
    result = []
    for detection in detections:
        masks = detection["masks"]
        if masks.dim() == 4:
            masks = masks.squeeze(1)
        masks = masks > MASK_THRESHOLD if masks.is_floating_point() else masks.bool()
        result.append({**detection, "masks": masks})
    return result


def detection_scores(meter: MeanAveragePrecision) -> dict[str, float]:
    """{"box_ap", "box_ap50", "mask_ap", "mask_ap50"} of everything `meter` has seen; -1 when
    there was nothing to find (the COCO convention)."""
    computed = meter.compute()
    return {ours: float(computed[theirs]) for ours, theirs in _KEYS.items()}


def detection_ap(predictions: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> dict[str, float]:
    """COCO box and mask AP of one prediction dict per image ("boxes" xyxy [K, 4], "scores" [K],
    "labels" [K], "masks" [K, H, W] or [K, 1, H, W], bool or probabilities) against the targets
    (as det samples give them): {"box_ap", "box_ap50", "mask_ap", "mask_ap50"}."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets; pass one "
                         "prediction dict per image, an empty one where nothing was found")
    meter = detection_meter()
    meter.update(binary_masks(predictions), binary_masks(targets))
    return detection_scores(meter)
