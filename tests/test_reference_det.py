"""The det reference model as a task model like the others: stored and loaded, scored by
`evaluate`, trained by `fit` with the recipe's batching and loss, patched by `patch_reference`,
and reached from the command line."""

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import tokensieve as ts
from tokensieve.cli import main
from tokensieve.reference import (
    Phase,
    SegmentationViT,
    evaluate,
    image_encoder,
    load_reference,
    patch_reference,
    save_reference,
)
from tokensieve.reference.detection import build_detector
from tokensieve.reference.recipes.phases import phase_objective
from tokensieve.reference.transfer import start_from_seg
from tokensieve.tasks import collate, make_dataset
from tokensieve.train import TrainConfig, fit, load_trained

SIDE = 64


def _tiny_config(side: int = SIDE) -> transformers.ViTConfig:
    return transformers.ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=64, image_size=side, patch_size=side // 8,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _detector(side: int = SIDE):
    """A small ViT under the det model's own pyramid and heads: the layout load_reference builds."""
    torch.manual_seed(0)
    return build_detector(_tiny_config(side), side).eval()


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    directory = tmp_path_factory.mktemp("det")
    save_reference(_detector(), directory)
    return directory


def _predict(detector, images) -> list[dict]:
    with torch.no_grad():
        return detector(list(images))


def test_a_stored_det_model_loads_every_weight_and_detects_as_before(stored):
    model = _detector()
    loaded = load_reference("det", stored)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for (name, value), other in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(value.half().float() if value.is_floating_point() else value, other), name
    images = collate([make_dataset("det", "val", size=1, image_size=SIDE)[0]])["image"]
    model.load_state_dict(loaded.state_dict())
    for mine, theirs in zip(_predict(loaded, images), _predict(model, images), strict=True):
        assert torch.equal(mine["boxes"], theirs["boxes"])


def test_a_det_directory_without_its_heads_or_with_a_missing_weight_is_refused(stored, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((stored / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"holds no detector\.safetensors"):
        load_reference("det", tmp_path)
    heads = load_file(stored / "detector.safetensors")
    dropped = "roi_heads.mask_predictor.mask_fcn_logits.weight"
    del heads[dropped]
    save_file(heads, tmp_path / "detector.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"detector\.safetensors lacks.*{dropped}"):
        load_reference("det", tmp_path)


def test_a_seg_directory_is_not_taken_for_a_det_one(tmp_path):
    save_reference(SegmentationViT(transformers.ViTModel(_tiny_config(), add_pooling_layer=False)), tmp_path)
    with pytest.raises(ValueError, match=r"holds the seg reference model"):
        load_reference("det", tmp_path)


def test_evaluate_scores_det_with_the_coco_metric_and_refuses_another_model():
    data = make_dataset("det", "val", size=3, image_size=SIDE)
    scores = evaluate(_detector(), "det", data, progress=False)
    assert set(scores) == {"box_ap", "box_ap50", "mask_ap", "mask_ap50"}
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    with pytest.raises(TypeError, match="det evaluation needs the det model"):
        evaluate(SegmentationViT(transformers.ViTModel(_tiny_config(), add_pooling_layer=False)), "det", data,
                 progress=False)


@pytest.mark.parametrize("method", [None, ts.DynamicViT(keep=0.5, layers=(1, 2))],
                         ids=["dense", "dynamicvit"])
def test_fit_trains_the_detector_on_the_recipes_batches_and_loss(method):
    detector = _detector()
    if method is not None:
        patch_reference(detector, method)
    loss, read, collate_fn = phase_objective("det", Phase(SIDE, 2, 1e-3, 1), attributes=False)
    before = {name: p.detach().clone() for name, p in detector.named_parameters()}
    config = TrainConfig(train="model", steps=2, batch_size=2, lr=1e-3, warmup_steps=1, distill_weight=0.0,
                         progress=False)
    result = fit(detector, make_dataset("det", "train", size=4, image_size=SIDE), loss, config,
                 collate_fn=collate_fn, logits_of=read)
    assert result.step == 2
    changed = {name for name, p in detector.named_parameters() if not torch.equal(p, before[name])}
    assert any(name.startswith("backbone.vit.") for name in changed)
    assert any(name.startswith("roi_heads.mask_head") for name in changed)


def test_a_method_trained_inside_the_detector_loads_into_a_fresh_one(tmp_path):
    """The patched ViT sits inside the detector: load_trained finds it there, as fit did."""
    trained = _detector()
    patch_reference(trained, ts.DynamicViT(keep=0.5, layers=(1, 2)))
    loss, read, collate_fn = phase_objective("det", Phase(SIDE, 1, 1e-3, 1), attributes=False)
    config = TrainConfig(train="model", steps=1, batch_size=2, lr=1e-2, warmup_steps=1, distill_weight=0.0,
                         progress=False, checkpoint_dir=str(tmp_path))
    fit(trained, make_dataset("det", "train", size=2, image_size=SIDE), loss, config, collate_fn=collate_fn,
        logits_of=read)
    fresh = _detector()
    patch_reference(fresh, ts.DynamicViT(keep=0.5, layers=(1, 2)))
    load_trained(fresh, tmp_path)
    for (name, value), other in zip(ts.sieve_of(trained.backbone.vit).state_dict().items(),
                                    ts.sieve_of(fresh.backbone.vit).state_dict().values(), strict=True):
        assert torch.equal(value, other), name
    assert all(torch.equal(p, q) for p, q in zip(trained.parameters(), fresh.parameters(), strict=True))


def test_patch_reference_prunes_the_det_models_vit_in_dense_mode():
    detector = _detector()
    patch_reference(detector, ts.RandomDrop(keep=0.5, layers=(2,)))
    assert image_encoder(detector) is detector.backbone.vit
    images = collate([make_dataset("det", "val", size=1, image_size=SIDE)[0]])["image"]
    with ts.trace(detector.backbone.vit) as traces:
        _predict(detector, images)
    assert traces[0].kept_tokens()[-1].item() < traces[0].input_tokens  # pruned, yet the pyramid ran


def test_the_seg_start_fills_the_det_models_vit():
    seg = SegmentationViT(transformers.ViTModel(_tiny_config(), add_pooling_layer=False)).backbone
    detector = start_from_seg(_detector(), seg)
    assert all(torch.equal(detector.backbone.vit.state_dict()[name], value)
               for name, value in seg.state_dict().items())


def test_tokensieve_eval_det_prints_box_and_mask_ap(tmp_path):
    save_reference(_detector(side=224), tmp_path)  # the CLI scores the task's 224×224 images
    result = CliRunner().invoke(main, ["eval", "det", "random:keep=0.5,layers=(2,)", "--weights",
                                       str(tmp_path), "--samples", "2", "--split", "val", "--json"])
    assert result.exit_code == 0, result.output
    assert '"metric": "box_ap"' in result.output and '"mask_ap"' in result.output
    assert '"method": "RandomDrop(keep=0.5, layers=(2,))"' in result.output
