"""Metrics against small examples worked out by hand."""

import math

import pytest
import torch

from tokensieve.tasks.metrics import (
    accuracy,
    ciou,
    class_iou,
    confusion_matrix,
    giou,
    intersection_union,
    mean_iou,
    recall_at_k,
)


def test_accuracy_from_scores_or_from_class_ids():
    labels = torch.tensor([1, 1, 1])
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert accuracy(scores, labels) == pytest.approx(2 / 3)
    assert accuracy(torch.tensor([1, 0, 1]), labels) == pytest.approx(2 / 3)


def _example() -> torch.Tensor:
    labels = torch.tensor([[0, 0, 0, 1], [1, 2, 255, 255]])
    predictions = torch.tensor([[0, 0, 1, 1], [1, 0, 2, 0]])  # the two 255 pixels are skipped
    return confusion_matrix(predictions, labels, num_classes=3)


def test_confusion_matrix_counts_true_rows_against_predicted_columns_and_skips_ignored():
    assert _example().tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_iou_per_class_and_mean_with_and_without_background():
    # class 0: 2 hits / (3 predicted + 3 true - 2) = 1/2; class 1: 2 / (3 + 2 - 2) = 2/3; class 2: 0 / 1
    assert class_iou(_example()).tolist() == pytest.approx([1 / 2, 2 / 3, 0.0])
    assert mean_iou(_example()) == pytest.approx((2 / 3 + 0) / 2)
    assert mean_iou(_example(), background=None) == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)


def test_classes_absent_everywhere_are_left_out_of_the_mean():
    padded = torch.zeros(4, 4, dtype=torch.long)
    padded[:3, :3] = _example()
    assert math.isnan(class_iou(padded)[3].item())
    assert mean_iou(padded) == pytest.approx(mean_iou(_example()))


def test_summing_batch_matrices_equals_one_matrix_over_the_split():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (6, 8, 8), generator=generator)
    predictions = torch.randint(0, 4, (6, 8, 8), generator=generator)
    whole = confusion_matrix(predictions, labels, 4)
    first = confusion_matrix(predictions[:2], labels[:2], 4)
    assert torch.equal(whole, first + confusion_matrix(predictions[2:], labels[2:], 4))


def test_giou_averages_per_sample_iou_and_ciou_pools_pixels():
    predictions = torch.zeros(3, 2, 4, dtype=torch.bool)
    targets = torch.zeros(3, 2, 4, dtype=torch.bool)
    predictions[0, 0, :4] = True  # 4 predicted, 2 of them right: IoU 2/4
    targets[0, 0, :2] = True
    predictions[1, 1, 0] = True  # 1 predicted, 3 true, none shared: IoU 0/4
    targets[1, 0, 1:4] = True
    # sample 2: nothing predicted, nothing to find: IoU 1
    intersections, unions = intersection_union(predictions, targets)
    assert intersections.tolist() == [2, 0, 0] and unions.tolist() == [4, 4, 0]
    assert giou(intersections, unions) == pytest.approx((0.5 + 0 + 1) / 3)
    assert ciou(intersections, unions) == pytest.approx(2 / 8)


def test_recall_at_k_both_ways():
    similarity = torch.tensor([[0.9, 0.1, 0.0],
                               [0.8, 0.5, 0.2],
                               [0.3, 0.6, 0.4]])
    # rows (image -> text): ranks 1, 2, 2; columns (text -> image): ranks 1, 2, 1
    recall = recall_at_k(similarity, ks=(1, 2))
    assert recall["image_to_text@1"] == pytest.approx(1 / 3)
    assert recall["image_to_text@2"] == pytest.approx(1.0)
    assert recall["text_to_image@1"] == pytest.approx(2 / 3)
    assert recall["text_to_image@2"] == pytest.approx(1.0)


def test_ties_count_against_the_model():
    recall = recall_at_k(torch.ones(3, 3), ks=(1, 5))
    assert recall["image_to_text@1"] == 0.0 and recall["text_to_image@5"] == 1.0


def test_recall_needs_a_square_matrix():
    with pytest.raises(ValueError, match="square"):
        recall_at_k(torch.zeros(2, 3))
