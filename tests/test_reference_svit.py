"""SViT on the reference models: trained by `train_method` with its paper's recipe, its thresholds
set on the validation split, stored with the fine-tuned host, loaded by one call, and scored by
`tokensieve eval` against dense. Tiny models stand in for the shipped ones."""

import json

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file

import tokensieve as ts
from tokensieve.calibration import Calibration
from tokensieve.cli import main
from tokensieve.reference import (
    SegmentationViT,
    calibrate_reference,
    calibration,
    image_encoder,
    load_method,
    method_weights,
    patch_reference,
    save_reference,
    shipped_methods,
    store,
    train_method,
)
from tokensieve.reference.detection import build_detector
from tokensieve.reference.models import IMAGE_SIZE
from tokensieve.reference.recipes import phases
from tokensieve.reference.shipped_methods import METHOD_STATE
from tokensieve.tasks import make_dataset

TASKS = ("seg", "cls", "det")


def _tiny_config(labels: int = 1) -> transformers.ViTConfig:
    # the native 224-pixel input with 16-pixel patches, as the reference models read the tasks' images
    return transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        image_size=IMAGE_SIZE, patch_size=16, num_labels=labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _tiny_model(task: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if task == "seg":
        return SegmentationViT(transformers.ViTModel(_tiny_config(), add_pooling_layer=False))
    if task == "cls":
        return transformers.ViTForImageClassification(_tiny_config(labels=8))
    return build_detector(_tiny_config(), IMAGE_SIZE)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A stand-in for the package's weights directory, with tiny dense models of TASKS and, once
    trained, their SViT runs; small validation and calibration sets; every split asked for."""
    root = tmp_path_factory.mktemp("weights")
    for task in TASKS:
        save_reference(_tiny_model(task), root / task)
    asked = []

    def recording(task, split, **options):
        asked.append(split)
        return make_dataset(task, split, **options)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store, "shipped_weights", lambda task: root / task)
        patch.setattr(phases, "VALIDATION_SAMPLES", 2)
        patch.setitem(phases.TASK_VALIDATION_SAMPLES, "det", 2)
        patch.setattr(calibration, "DEFAULT_CALIBRATION_SAMPLES", 8)
        patch.setitem(calibration.CALIBRATION_SAMPLES, "det", 4)
        patch.setattr(calibration, "make_dataset", recording)
        yield root, asked


@pytest.fixture(scope="module")
def trained(package, tmp_path_factory):
    """Each task's tiny model trained two steps with SViT and stored in the package stand-in."""
    _, asked = package
    runs = {}
    for task in TASKS:
        asked.clear()
        run = tmp_path_factory.mktemp(f"run-{task}")
        model = train_method(task, ts.SViT(keep=0.7), run, steps=2, batch_size=2, progress=False,
                             out_dir=method_weights(task, "svit"))
        runs[task] = model, run, list(asked)
    return runs


def _gates(model: torch.nn.Module) -> torch.nn.ModuleDict:
    return ts.sieve_of(image_encoder(model)).parts[0]


@pytest.mark.parametrize("task", TASKS)
def test_an_svit_run_sets_its_thresholds_on_the_validation_split_and_stores_them(trained, task):
    model, _, splits = trained[task]
    assert splits == ["val"]  # calibration asked for validation data only, never test
    thresholds = {layer: float(gate.threshold) for layer, gate in _gates(model).items()}
    assert list(thresholds) == ["1", "2", "3"]  # blocks 1..3 of 4
    assert all(value != 0.5 for value in thresholds.values())  # moved from the uncalibrated start
    stored = load_file(method_weights(task, "svit") / METHOD_STATE)
    assert {layer: float(stored[f"parts.0.{layer}.threshold"]) for layer in thresholds} == thresholds


@pytest.mark.parametrize("task", TASKS)
def test_an_svit_run_trains_with_its_keep_rate_loss_and_no_distillation(trained, task):
    _, run, _ = trained[task]
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [step["step"] for step in steps] == [1, 2]
    assert all(step["loss_distill"] is None and step["loss_keep_ratio"] is None for step in steps)
    assert all(step["method_losses"]["keep_rate"] >= 0 for step in steps)


@pytest.mark.parametrize("task", TASKS)
def test_load_method_gives_back_the_stored_host_gates_and_thresholds(trained, task):
    model, _, _ = trained[task]
    loaded = load_method(task, "svit")  # one call, from the package (here: its stand-in)
    assert ts.sieve_of(image_encoder(loaded)).method == ts.SViT(keep=0.7)
    for (name, value), other in zip(_gates(model).state_dict().items(), _gates(loaded).state_dict().values(),
                                    strict=True):
        assert torch.equal(value, other), name
    # the host was rounded to fp16 before calibration, so the stored one is the one calibrated
    for (name, value), other in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(value, other), name


def test_a_macs_budget_sets_thresholds_that_spend_it(trained):
    model = load_method("seg", "svit")  # a copy: the run's model keeps its thresholds for the other tests
    result = calibrate_reference(model, "seg", macs_budget=0.7)
    assert isinstance(result, Calibration)
    assert result.macs / result.dense_macs == pytest.approx(0.7, abs=0.02)


def test_tokensieve_eval_scores_the_shipped_svit_after_dense(trained):
    result = CliRunner().invoke(main, ["eval", "seg", "svit", "--samples", "2", "--split", "val", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["method"] for row in rows] == ["dense", "SViT(keep=0.7)"]
    assert rows[1]["gmacs"] < rows[0]["gmacs"]  # gates included, as ts.flops counts them
    shipped = load_method("seg", "svit")
    images = torch.stack([sample["image"] for sample in make_dataset("seg", "val", size=2)])
    scored = ts.flops(image_encoder(shipped), images)
    assert rows[1]["gmacs"] == pytest.approx(scored.macs / 1e9)  # the stored gates and thresholds
    assert scored.overhead["gate"] > 0  # the gates' own cost is counted


def test_a_bare_method_name_scores_the_shipped_training_with_the_settings_it_was_stored_with(
        trained, tmp_path, monkeypatch):
    model = load_method("seg", "svit")
    plain = shipped_methods.save_method(model, tmp_path / "plain")
    gates = ts.sieve_of(image_encoder(model)).state_dict()
    patch_reference(model, ts.SViT(keep=0.7, dither=True)).load_state_dict(gates)  # shipped dithered
    save_reference(store.load_reference("seg"), tmp_path / "seg")
    shipped_methods.save_method(model, tmp_path / "seg-svit")
    monkeypatch.setattr(store, "shipped_weights", lambda task: tmp_path / task)
    arguments = ["eval", "seg", "svit", "svit:keep=0.7", "--samples", "2", "--split", "val", "--json"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["method"] for row in rows] == ["dense", "SViT(keep=0.7, dither=True)", "SViT(keep=0.7)"]
    images = torch.stack([sample["image"] for sample in make_dataset("seg", "val", size=2)])
    assert rows[1]["gmacs"] == pytest.approx(ts.flops(image_encoder(model), images).macs / 1e9)
    given = CliRunner().invoke(main, [*arguments[:3], *arguments[4:], "--trained", f"svit={plain}"])
    assert given.exit_code == 0, given.output
    assert [row["method"] for row in json.loads(given.stdout)] == ["dense", "SViT(keep=0.7)"]  # the run given


def test_a_frozen_host_run_trains_the_gates_only_and_stores_them_without_the_host(trained, tmp_path):
    shipped = store.load_reference("seg")
    out = tmp_path / "frozen"
    shipped_methods.save_method(load_method("seg", "svit"), out)  # an earlier run's fine-tuned host there
    model = train_method("seg", ts.SViT(keep=0.7), tmp_path / "run", steps=2, batch_size=2, progress=False,
                         out_dir=out, freeze_host=True)
    for (name, value), other in zip(model.state_dict().items(), shipped.state_dict().values(), strict=True):
        assert torch.equal(value, other), name  # the host did not move
    assert sorted(path.name for path in out.iterdir()) == ["host.json", "method.json", METHOD_STATE]
    loaded = load_method("seg", "svit", out)  # the shipped host, with the run's gates and thresholds
    for (name, value), other in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(value, other), name
    assert any(float(gate.threshold) != 0.5 for gate in _gates(loaded).values())
    with pytest.raises(ValueError, match="trained on the seg reference model, not cls"):
        load_method("cls", "svit", out)


def test_gates_of_a_frozen_host_refuse_other_weights_of_it(trained, tmp_path, monkeypatch):
    out = shipped_methods.save_method(load_method("seg", "svit"), tmp_path / "gates", shipped_host="seg")
    other = store.load_reference("seg")
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    monkeypatch.setattr(shipped_methods.store, "load_reference", lambda task, path=None: other)
    with pytest.raises(ValueError, match="other weights of the seg reference model"):
        load_method("seg", "svit", out)


def test_a_method_is_not_stored_over_a_reference_model(package, tmp_path):
    store.save_reference(store.load_reference("seg"), tmp_path / "reference")
    model = store.load_reference("seg")
    patch_reference(model, ts.SViT(keep=0.7))
    for shipped_host in (None, "seg"):
        with pytest.raises(ValueError, match="holds a reference model, not a trained method"):
            shipped_methods.save_method(model, tmp_path / "reference", shipped_host=shipped_host)
    held = ["config.json", "model.safetensors", "head.safetensors"]
    assert store.stored_files(tmp_path / "reference") == held


def test_train_cli_freezes_the_host_of_a_method_run_only(monkeypatch):
    import tokensieve.reference as reference

    calls = []
    monkeypatch.setattr(reference, "train_method", lambda task, method, run, **options: calls.append(options))
    runner = CliRunner()
    result = runner.invoke(main, ["train", "seg", "--method", "svit:keep=0.7", "--steps", "5",
                                  "--freeze-host", "--out", "elsewhere"])
    assert result.exit_code == 0, result.output
    assert calls[0]["freeze_host"] is True
    result = runner.invoke(main, ["train", "seg", "--freeze-host"])
    assert result.exit_code != 0 and "give --method" in result.output
    result = runner.invoke(main, ["train", "seg", "--method", "svit", "--freeze-host",
                                  "--model-lr-scale", "0.1"])
    assert result.exit_code != 0 and "no --model-lr-scale" in result.output


def test_only_the_shipped_settings_are_scored_as_shipped(trained):
    assert shipped_methods.shipped_method("seg", ts.SViT(keep=0.7)) == method_weights("seg", "svit")
    assert shipped_methods.shipped_method("seg", ts.SViT(keep=0.5)) is None
    assert shipped_methods.shipped_method("seg", ts.DynamicViT(keep=0.7)) is None


def test_load_method_names_the_command_that_trains_what_is_missing(package, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokensieve train seg --method svit"):
        load_method("seg", "svit", tmp_path)
    with pytest.raises(ValueError, match="choose one of"):
        method_weights("seg", "sivt")


def test_train_cli_passes_a_macs_budget_to_a_thresholded_run_only(monkeypatch, tmp_path):
    import tokensieve.reference as reference

    calls = []
    monkeypatch.setattr(reference, "train_method", lambda task, method, run, **options: calls.append(options))
    runner = CliRunner()
    result = runner.invoke(main, ["train", "seg", "--method", "svit:keep=0.7", "--steps", "5",
                                  "--macs-budget", "0.62", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert calls == [{"steps": 5, "macs_budget": 0.62, "out_dir": tmp_path}]
    result = runner.invoke(main, ["train", "seg", "--method", "dynamicvit:keep=0.7", "--macs-budget", "0.62"])
    assert result.exit_code != 0 and "sets a method's thresholds" in result.output
    result = runner.invoke(main, ["train", "seg", "--macs-budget", "0.62"])
    assert result.exit_code != 0 and "give --method svit" in result.output


def test_tokensieve_eval_scores_a_stored_svit_given_by_trained(trained, tmp_path):
    shipped_methods.save_method(load_method("seg", "svit"), tmp_path / "elsewhere")
    arguments = ["eval", "seg", "svit", "--samples", "2", "--split", "val", "--json", "--trained"]
    result = CliRunner().invoke(main, [*arguments, f"svit={tmp_path / 'elsewhere'}"])
    assert result.exit_code == 0, result.output
    shipped = CliRunner().invoke(main, arguments[:-1])
    assert json.loads(result.stdout)[1] == json.loads(shipped.stdout)[1]
    wrong = CliRunner().invoke(main, ["eval", "seg", "svit:keep=0.5", "--samples", "2", "--trained",
                                      f"svit:keep=0.5={tmp_path / 'elsewhere'}"])
    assert wrong.exit_code != 0 and "holds SViT(keep=0.7), not SViT(keep=0.5)" in str(wrong.exception)


def test_the_dense_control_fine_tunes_the_host_alone_by_the_same_recipe(package, tmp_path):
    shipped = store.load_reference("seg")
    model = train_method("seg", None, tmp_path / "dense", steps=2, batch_size=2, progress=False,
                         model_lr_scale=0.5)
    assert not ts.is_patched(image_encoder(model))
    moved = [name for (name, value), other in zip(model.state_dict().items(), shipped.state_dict().values(),
                                                  strict=True) if not torch.equal(value, other)]
    assert moved  # the host trained
    logged = [json.loads(line) for line in (tmp_path / "dense" / "log.jsonl").read_text().splitlines()]
    assert all(entry["loss_distill"] is None for entry in logged)  # no teacher but itself
    with pytest.raises(ValueError, match="no method to store"):
        train_method("seg", None, tmp_path / "other", steps=2, batch_size=2, out_dir=tmp_path / "out")


def test_train_cli_asks_where_to_store_a_calibrated_vltp_or_madtp_run(monkeypatch):
    import tokensieve.reference as reference

    calls = []
    monkeypatch.setattr(reference, "train_method", lambda task, method, run, **options: calls.append(options))
    runner = CliRunner()
    for task, spec in (("tos", "vltp:by_threshold=true"), ("nlvr", "madtp")):
        result = runner.invoke(main, ["train", task, "--method", spec, "--macs-budget", "0.6"])
        assert result.exit_code != 0 and "give --out DIR" in result.output
    assert calls == []
