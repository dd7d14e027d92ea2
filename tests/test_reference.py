"""Reference models: built from their recipe with fit, shipped in fp16, loaded with from_pretrained."""

import json

import pytest
import torch
from click.testing import CliRunner

import tokensieve as ts
from tokensieve.cli import main as cli
from tokensieve.reference import (
    Phase,
    Recipe,
    build_model,
    evaluate,
    image_encoder,
    load_method,
    load_reference,
    save_reference,
    train_reference,
)
from tokensieve.tasks import make_dataset

# Two phases at small sizes, two steps each: the whole pipeline in a few seconds.
TINY_RECIPE = {task: Recipe(task, (Phase(64, 2, 1e-3, 1), Phase(96, 2, 5e-4, 0)), batch_size=4)
               for task in ("cls", "seg")}


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_a_reference_model_trains_by_phases_and_ships_in_half_precision(tmp_path, task):
    recipe = TINY_RECIPE[task]
    model = train_reference(task, tmp_path / "run", tmp_path / "out", recipe=recipe, progress=False)
    for phase in ("phase-0-64px", "phase-1-96px"):
        lines = (tmp_path / "run" / phase / "log.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2]
        assert "eval" in json.loads(lines[-1])  # the validation score closes each phase
    stored = [p.stat().st_size for p in (tmp_path / "out").iterdir() if p.suffix == ".safetensors"]
    parameters = sum(p.numel() for p in model.parameters())
    assert sum(stored) < 2.1 * parameters  # two bytes per weight, plus headers

    loaded = load_reference(task, tmp_path / "out")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = make_dataset(task, "val", size=2, image_size=64)[0]["image"][None]
    with torch.no_grad():
        expected = _logits(model, x)
        assert torch.allclose(_logits(loaded, x), expected, atol=0.05 * expected.abs().max())


def test_training_again_resumes_every_phase_and_changes_nothing(tmp_path):
    first = train_reference("cls", tmp_path / "run", recipe=TINY_RECIPE["cls"], progress=False)
    again = train_reference("cls", tmp_path / "run", recipe=TINY_RECIPE["cls"], progress=False)
    for (name, value), other in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(value, other), name


def test_the_seg_model_runs_pruned_in_dense_mode_and_scores_a_split(tmp_path):
    model = build_model("seg").eval()
    ts.patch(model.backbone, ts.RandomDrop(keep=0.5, layers=(6,)), dense=True)
    data = make_dataset("seg", "val", size=4, image_size=64)
    with ts.trace(model.backbone) as traces:
        score = evaluate(model, "seg", data, batch_size=2, progress=False)
    assert 0.0 <= score["mIoU"] <= 1.0
    assert traces and all(t.kept_tokens()[-1].eq(1 + 8).all() for t in traces)  # 16 patches, half kept


def test_missing_weights_and_unknown_tasks_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokensieve train cls"):
        load_reference("cls", tmp_path)
    with pytest.raises(ValueError, match="choose one of cls, seg, tos, nlvr, retrieval"):
        load_reference("vqa", tmp_path)
    save_reference(build_model("cls"), tmp_path / "cls")
    assert (tmp_path / "cls" / "config.json").is_file()


def _logits(model, x):
    output = model(pixel_values=x, interpolate_pos_encoding=True) if hasattr(model, "vit") else model(x)
    return output if isinstance(output, torch.Tensor) else output.logits


def test_the_shipped_seg_model_loads_and_segments_validation_scenes():
    model = load_reference("seg")  # the fp16 weights inside the package
    data = make_dataset("seg", "val", size=8)
    score = evaluate(model, "seg", data, batch_size=4, progress=False)["mIoU"]
    assert score > 0.4  # a trained model (test split: 0.643); random weights score near 0


@pytest.mark.parametrize(("task", "method", "metric", "floor"), [
    ("seg", ts.SViT(keep=0.7, dither=True), "mIoU", 0.4),  # each rule chosen on validation
    ("det", ts.SViT(keep=0.7), "box_ap", 0.3),
    ("cls", ts.SViT(keep=0.7, dither=True), "accuracy", 0.4),
])
def test_the_shipped_svit_loads_in_one_call_and_spends_under_65_percent_of_dense_macs(task, method, metric,
                                                                                       floor):
    model = load_method(task, "svit")  # the fine-tuned host, its gates and calibrated thresholds
    assert ts.sieve_of(image_encoder(model)).method == method
    data = make_dataset(task, "val", size=8)
    score = evaluate(model, task, data, batch_size=4, progress=False)[metric]
    assert score > floor  # trained (test split: see docs/svit.md); untrained gates keep scores near 0
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    pruned = ts.flops(image_encoder(model), images)
    dense = ts.flops(image_encoder(load_reference(task)), images)
    assert pruned.overhead["gate"] > 0 and pruned.macs < 0.65 * dense.macs  # calibrated to 0.63


def test_the_shipped_cls_model_loads_and_classifies_validation_scenes():
    model = load_reference("cls")
    data = make_dataset("cls", "val", size=32)
    score = evaluate(model, "cls", data, batch_size=16, progress=False)["accuracy"]
    assert score > 0.4  # a trained model (about 0.75 on validation); chance is 1/8


def test_the_shipped_tos_model_loads_and_follows_the_sentence():
    model = load_reference("tos")
    data = make_dataset("tos", "val", size=16)  # 4 images, 4 sentences each, at 256 px
    score = evaluate(model, "tos", data, batch_size=8, progress=False)["gIoU"]
    assert score > 0.35  # a trained model (about 0.61 on validation); an untrained one scores near 0


def test_the_shipped_retrieval_model_loads_and_finds_the_captions():
    model = load_reference("retrieval")
    data = make_dataset("retrieval", "val", size=32)  # one gallery of 32 images and captions
    score = evaluate(model, "retrieval", data, batch_size=16, progress=False)["R@1"]
    assert score > 0.5  # a trained model (0.69 in a validation gallery of 500); chance is 1/32


def test_the_public_api_leaves_the_recipes_training_scaffolding_out():
    import tokensieve.reference as reference

    modules = {name: getattr(getattr(reference, name), "__module__", "") for name in reference.__all__}
    recipes = "tokensieve.reference.recipes."
    training_only = {name for name, module in modules.items()
                     if module.startswith(recipes) and module != recipes + "definitions"}
    assert not training_only
    assert {"RECIPES", "Phase", "Recipe", "train_reference", "load_reference", "patch_reference",
            "evaluate"} <= set(reference.__all__)


def test_train_cli_passes_the_host_lr_scale_to_a_method_run_only(monkeypatch):
    import tokensieve.reference as reference

    calls = []
    monkeypatch.setattr(reference, "train_method", lambda task, method, run, **options: calls.append(options))
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "cls", "--method", "dynamicvit:keep=0.7", "--steps", "5",
                                 "--model-lr-scale", "0.01"])
    assert result.exit_code == 0, result.output
    # a DynamicViT run is loaded from its checkpoints: nothing stored beyond them unless --out says
    assert calls == [{"steps": 5, "model_lr_scale": 0.01, "out_dir": None}]
    result = runner.invoke(cli, ["train", "cls", "--model-lr-scale", "0.01"])
    assert result.exit_code != 0 and "give --method too" in result.output
    result = runner.invoke(cli, ["train", "cls", "--method", "dynamicvit:keep=0.7", "--steps", "5",
                                 "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    assert calls[-1] == {"steps": 5, "precision": "bf16", "out_dir": None}
    result = runner.invoke(cli, ["train", "cls", "--precision", "bf16"])
    assert result.exit_code != 0 and "recipe's" in result.output


def test_the_shipped_nlvr_model_loads_and_judges_the_statements():
    model = load_reference("nlvr")
    data = make_dataset("nlvr", "val", size=100)
    score = evaluate(model, "nlvr", data, batch_size=50, progress=False)["accuracy"]
    assert score > 0.6  # a trained model (0.812 on 500 validation statements); chance is 0.5
