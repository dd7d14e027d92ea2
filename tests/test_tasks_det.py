"""det: one target per visible object (tight box of its visible mask, its shape's class), in
torchvision's detection format, and COCO AP from torchmetrics over such targets."""

import pytest
import torch

from tokensieve.tasks import DET_CLASSES, SHAPES, collate, detection_ap, instance_targets, make_dataset
from tokensieve.tasks.det_metrics import binary_masks, detection_meter, detection_scores
from tokensieve.tasks.scenes import Scene, SceneObject, render


def _as_predictions(targets: list[dict]) -> list[dict]:
    return [{**t, "scores": torch.ones(len(t["labels"]))} for t in targets]


def _shifted(target: dict, pixels: int) -> dict:
    """The same instances moved `pixels` to the right."""
    masks = torch.roll(target["masks"], pixels, dims=2)
    return {**target, "boxes": target["boxes"] + torch.tensor([pixels, 0, pixels, 0]), "masks": masks}


def test_same_index_gives_the_same_targets():
    first, again = make_dataset("det", "val", size=3)[2], make_dataset("det", "val", size=3)[2]
    for key in ("boxes", "labels", "masks"):
        assert torch.equal(first["target"][key], again["target"][key])
    assert not torch.equal(first["target"]["masks"], make_dataset("det", "val", size=3)[1]["target"]["masks"])


def test_each_box_is_the_tight_box_of_its_visible_mask_and_labels_are_shapes():
    data = make_dataset("det", "val", size=6)
    for i in range(6):
        target, scene = data[i]["target"], data.scene(i)
        boxes, labels, masks = target["boxes"], target["labels"], target["masks"]
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64 and masks.dtype == torch.uint8
        assert torch.equal(masks.bool(), torch.from_numpy(render(scene).masks))  # scenes hide no object
        assert labels.tolist() == [1 + SHAPES.index(o.shape) for o in scene.objects]
        for box, mask in zip(boxes.tolist(), masks.bool(), strict=True):
            rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
            assert box == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        assert labels.min() >= 1 and labels.max() < len(DET_CLASSES)


def test_an_object_hidden_by_later_ones_gets_no_target():
    def shape(kind: str, center: tuple[float, float], radius: float) -> SceneObject:
        return SceneObject(kind, "red", "small", center, radius, 0.0, (0.9, 0.1, 0.1), (0.0, 0.0))

    scene = Scene(size=64, objects=(shape("star", (20, 20), 4), shape("square", (20, 20), 14),
                                    shape("circle", (50, 50), 6)), background_seed=0)
    target = instance_targets(scene, render(scene))
    assert target["labels"].tolist() == [1 + SHAPES.index("square"), 1 + SHAPES.index("circle")]
    assert target["masks"].shape == (2, 64, 64) and target["boxes"].shape == (2, 4)


def test_collate_keeps_one_target_dict_per_image():
    data = make_dataset("det", "test", size=2)
    batch = collate([data[0], data[1]])
    assert batch["image"].shape == (2, 3, 224, 224)
    assert [len(t["labels"]) for t in batch["target"]] == [len(data[i]["target"]["labels"]) for i in (0, 1)]


def test_ap_is_one_on_the_ground_truth_and_lower_on_a_shifted_copy():
    data = make_dataset("det", "val", size=4)
    targets = [data[i]["target"] for i in range(4)]
    perfect = detection_ap(_as_predictions(targets), targets)
    assert perfect == pytest.approx({"box_ap": 1.0, "box_ap50": 1.0, "mask_ap": 1.0, "mask_ap50": 1.0})
    nudged = detection_ap(_as_predictions([_shifted(t, 4) for t in targets]), targets)
    assert nudged["box_ap"] < 1.0 and nudged["mask_ap"] < 1.0  # misses the strict IoU thresholds
    assert nudged["box_ap50"] > nudged["box_ap"] and nudged["mask_ap50"] > nudged["mask_ap"]
    moved = detection_ap(_as_predictions([_shifted(t, 30) for t in targets]), targets)
    for key in perfect:
        assert 0.0 <= moved[key] < 0.5, key


def test_soft_masks_with_a_channel_dimension_are_thresholded():
    target = make_dataset("det", "val", size=1)[0]["target"]
    soft = target["masks"][:, None].float() * 0.9 + 0.05  # [K, 1, H, W] probabilities
    prediction = {**target, "masks": soft, "scores": torch.ones(len(target["labels"]))}
    assert detection_ap([prediction], [target])["mask_ap"] == pytest.approx(1.0)


def test_prediction_and_target_counts_must_match():
    target = make_dataset("det", "val", size=1)[0]["target"]
    with pytest.raises(ValueError, match="one prediction dict per image"):
        detection_ap([], [target])


def test_accumulating_batches_gives_the_scores_of_the_whole_list():
    data = make_dataset("det", "val", size=4)
    targets = [data[i]["target"] for i in range(4)]
    predictions = _as_predictions([_shifted(t, 3) for t in targets[:2]] + targets[2:])
    meter = detection_meter()
    for batch in (slice(0, 2), slice(2, 4)):
        meter.update(binary_masks(predictions[batch]), binary_masks(targets[batch]))
    assert detection_scores(meter) == pytest.approx(detection_ap(predictions, targets))
