"""The det reference model's architecture: Mask R-CNN on a ViT through a simple feature pyramid,
trainable on det batches, scored by the det metric, prunable in dense mode, startable from seg."""

import math

import pytest
import torch
import transformers
from registry import methods

import tokensieve as ts
from tokensieve.reference import SegmentationViT, load_reference, save_reference
from tokensieve.reference.detection import build_detector, detector_from_seg
from tokensieve.tasks import collate, detection_ap, make_dataset

SIDE = 64  # 8x8 patches of 8 px: the 64-patch, 4-block size the registry's methods are set for
LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def _tiny_config() -> transformers.ViTConfig:
    return transformers.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=64, image_size=SIDE, patch_size=8,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _detector():
    return build_detector(_tiny_config(), SIDE, out_channels=16).eval()


@pytest.fixture(scope="module")
def batch():
    data = make_dataset("det", "val", size=2, image_size=SIDE)
    return collate([data[0], data[1]])


def _predict(detector, batch) -> list[dict]:
    with torch.no_grad():
        return detector(list(batch["image"]))


def test_training_mode_gives_the_five_mask_rcnn_losses_and_they_reach_every_part(batch):
    detector = _detector().train()
    losses = detector(list(batch["image"]), batch["target"])
    assert set(losses) == LOSSES
    assert all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    vit = detector.backbone.vit
    for part in (vit.embeddings.patch_embeddings.projection, vit.layers[-1].mlp.fc2,
                 detector.backbone.necks[0][0], detector.roi_heads.mask_predictor.mask_fcn_logits):
        assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0


def test_eval_mode_gives_finite_predictions_that_the_det_metric_scores(batch):
    predictions = _predict(_detector(), batch)
    assert len(predictions) == 2
    for prediction in predictions:
        assert prediction["masks"].shape[-2:] == (SIDE, SIDE)
        assert prediction["labels"].ge(1).all() and prediction["labels"].lt(7).all()
        assert all(torch.isfinite(prediction[key]).all() for key in ("boxes", "scores", "masks"))
    scores = detection_ap(predictions, batch["target"])
    assert set(scores) == {"box_ap", "box_ap50", "mask_ap", "mask_ap50"}
    assert all(math.isfinite(value) for value in scores.values())


def test_images_of_the_task_size_go_in_neither_resized_nor_normalised(batch):
    detector = _detector()
    images, _ = detector.transform(list(batch["image"]))
    assert images.image_sizes == [(SIDE, SIDE)] * 2
    torch.testing.assert_close(images.tensors, batch["image"], atol=1e-6, rtol=0)


def test_the_pyramid_gives_strides_a_quarter_to_four_patches(batch):
    detector = _detector()
    with torch.no_grad():
        maps = detector.backbone(batch["image"])
    grid = SIDE // 8
    assert {name: tuple(m.shape[-2:]) for name, m in maps.items()} == {
        "0": (4 * grid,) * 2, "1": (2 * grid,) * 2, "2": (grid,) * 2, "3": (grid // 2,) * 2,
        "pool": (grid // 4,) * 2}
    assert all(m.shape[1] == detector.backbone.out_channels for m in maps.values())


@pytest.mark.parametrize("method", methods("pruned", "ragged"))
def test_the_detector_runs_on_a_dense_patched_vit_that_prunes(method, batch):
    detector = _detector()
    ts.patch(detector.backbone.vit, method, dense=True)
    if isinstance(method, ts.SViT) and method.ragged:  # thresholds that split an untrained gate's ratings
        ts.calibrate(detector.backbone.vit, batch["image"])
    with ts.trace(detector.backbone.vit) as traces:
        predictions = _predict(detector, batch)
    assert all(torch.isfinite(p["boxes"]).all() and torch.isfinite(p["masks"]).all() for p in predictions)
    assert traces[0].kept_tokens()[-1].lt(1 + (SIDE // 8) ** 2).all()  # tokens were pruned


@pytest.mark.parametrize("method", methods("off"))
def test_a_dense_patched_vit_with_pruning_off_gives_the_unpatched_detections(method, batch):
    detector = _detector()
    expected = _predict(detector, batch)
    ts.patch(detector.backbone.vit, method, dense=True)
    _assert_same_detections(_predict(detector, batch), expected)


def test_pruning_disabled_gives_the_unpatched_detections(batch):
    detector = _detector()
    expected = _predict(detector, batch)
    ts.patch(detector.backbone.vit, ts.RandomDrop(keep=0.5, layers=(1, 2)), dense=True)
    with ts.pruning_disabled(detector.backbone.vit):
        _assert_same_detections(_predict(detector, batch), expected)


def _assert_same_detections(got: list[dict], expected: list[dict]) -> None:
    for mine, theirs in zip(got, expected, strict=True):
        assert torch.equal(mine["labels"], theirs["labels"])
        for key in ("boxes", "scores", "masks"):
            torch.testing.assert_close(mine[key], theirs[key], atol=1e-4, rtol=0)


def test_a_sparse_patched_vit_is_refused_with_the_dense_fix(batch):
    detector = _detector()
    ts.patch(detector.backbone.vit, ts.RandomDrop(keep=0.5, layers=(1,)))
    with pytest.raises(ValueError, match="dense=True"):
        _predict(detector, batch)


def test_the_seg_start_copies_every_weight_of_a_stored_seg_backbone(tmp_path, batch):
    seg = SegmentationViT(transformers.ViTModel(_tiny_config(), add_pooling_layer=False))
    save_reference(seg, tmp_path / "seg")
    source = load_reference("seg", tmp_path / "seg").backbone
    detector = detector_from_seg(source, SIDE).eval()
    expected = source.state_dict()
    copied = detector.backbone.vit.state_dict()
    assert copied.keys() == expected.keys()
    assert all(torch.equal(copied[name], tensor) for name, tensor in expected.items())
    assert detector.backbone.vit.config.to_dict() == source.config.to_dict()
    assert detector.backbone.vit.config is not source.config  # the detector owns its config
    _predict(detector, batch)


@pytest.mark.fullsize
def test_the_seg_start_defaults_to_the_shipped_seg_backbone_at_the_documented_size():
    detector = detector_from_seg()
    millions = {name: round(sum(p.numel() for p in part.parameters()) / 1e6, 1) for name, part in
                (("all", detector), ("vit", detector.backbone.vit), ("heads", detector.roi_heads))}
    assert millions == {"all": 8.0, "vit": 5.5, "heads": 1.5}  # docs/reference.md, det
    shipped = load_reference("seg").backbone.state_dict()
    copied = detector.backbone.vit.state_dict()
    assert all(torch.equal(copied[name], tensor) for name, tensor in shipped.items())
