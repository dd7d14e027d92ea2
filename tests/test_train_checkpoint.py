"""Checkpoints hold only what was trained, are written atomically, and are refused by another
model or another method."""

import dataclasses
import json
import re
import signal
import subprocess
import sys

import pytest
import torch
from test_train_support import (
    DYNAMICVIT,
    EVIT,
    patched_model,
    quiet_config,
    random_dataset,
    trained_state,
)

import tokensieve as ts
import tokensieve.train.atomic
import tokensieve.train.checkpoint
from tokensieve.train import cross_entropy, fit, latest_checkpoint, load_trained, read_checkpoint
from tokensieve.train.identity import check_same_method, method_config, method_defaults

ADAMW_STATE = {"exp_avg", "exp_avg_sq", "step"}


def _train(tmp_path, method=DYNAMICVIT, model=None, until=None, **settings):
    """A 4-step run checkpointing into tmp_path (resuming what is there), stopped at `until`."""
    model = model if model is not None else patched_model(method)
    config = quiet_config(steps=4, checkpoint_dir=str(tmp_path), **settings)
    return model, fit(model, random_dataset(16), cross_entropy, config, until=until)


def _groups(keys):
    return {key.split(".", 1)[0] for key in keys}


def test_a_method_checkpoint_holds_the_sieve_and_its_optimiser_state_only(tmp_path):
    model, result = _train(tmp_path, until=2)
    tensors, metadata = read_checkpoint(result.checkpoint)
    sieve = ts.sieve_of(model)
    assert _groups(tensors) == {"sieve", "optimizer", "rng"}
    assert {k.removeprefix("sieve.") for k in tensors if k.startswith("sieve.")} == set(sieve.state_dict())
    expected_optimizer = {f"optimizer.sieve.{name}.{field}" for name, _ in sieve.named_parameters()
                          for field in ADAMW_STATE}
    assert {k for k in tensors if k.startswith("optimizer.")} == expected_optimizer
    assert {k for k in tensors if k.startswith("rng.")} == {"rng.torch.0"}
    assert tensors["rng.torch.0"].dtype == torch.uint8
    assert metadata["trained"] == "method" and metadata["step"] == "2"
    assert metadata["method"] == repr(DYNAMICVIT)
    assert json.loads(metadata["method_config"]) == {"class": "DynamicViT", "keep": 0.7, "layers": [1, 2],
                                                     "dynamic": False, "preserve": True}
    host = json.loads(metadata["host"])
    assert host["class"] == "timm.models.vision_transformer.VisionTransformer"
    assert host["spec"]["depth"] == 4 and host["spec"]["dim"] == 32 and len(host["parameters"]) == 16
    assert metadata["tokensieve_version"] == ts.__version__
    assert json.loads(metadata["train_config"])["train"] == "method"


@pytest.mark.parametrize("method", [DYNAMICVIT, EVIT], ids=["dynamicvit", "evit"])
def test_a_model_checkpoint_adds_the_host_and_its_optimiser_state(tmp_path, method):
    model, result = _train(tmp_path, method, train="model", until=1)
    tensors, _ = read_checkpoint(result.checkpoint)
    sieve_keys = set(ts.sieve_of(model).state_dict())
    assert {k.removeprefix("model.") for k in tensors if k.startswith("model.")} == set(model.state_dict())
    assert {k.removeprefix("sieve.") for k in tensors if k.startswith("sieve.")} == sieve_keys
    trained = [f"model.{n}" for n, _ in model.named_parameters()] + [f"sieve.{n}" for n in sieve_keys]
    assert {k for k in tensors if k.startswith("optimizer.")} == {f"optimizer.{n}.{f}" for n in trained
                                                                  for f in ADAMW_STATE}


def test_load_trained_restores_the_trained_parameters_into_a_fresh_model(tmp_path):
    model, _ = _train(tmp_path, until=2)
    fresh = patched_model(method_seed=3)
    load_trained(fresh, tmp_path)
    for key, value in trained_state(model).items():
        assert torch.equal(value, trained_state(fresh)[key]), key


def test_a_checkpoint_for_another_model_is_refused(tmp_path):
    _train(tmp_path, until=2)
    wider = patched_model(embed_dim=48)
    message = r"trained on another model: .*width 32.* and this model is .*width 48"
    with pytest.raises(ValueError, match=message):
        load_trained(wider, tmp_path)
    with pytest.raises(ValueError, match=message):
        _train(tmp_path, model=wider)


def test_a_checkpoint_for_another_method_config_is_refused(tmp_path):
    _train(tmp_path, until=2)
    other = ts.DynamicViT(keep=0.5, layers=(1, 2))
    message = r"another method: it holds DynamicViT\(keep=0\.7.* patched with DynamicViT\(keep=0\.5"
    with pytest.raises(ValueError, match=message):
        load_trained(patched_model(other), tmp_path)
    with pytest.raises(ValueError, match=message):
        _train(tmp_path, other)


def test_a_config_saved_before_a_field_was_added_loads_at_that_fields_default():
    method = ts.DynamicViT(keep=0.7, layers=(1, 2))
    saved = method_config(method)
    del saved["preserve"]  # as a run saved before DynamicViT had the field holds it
    check_same_method(saved, method_config(method), "run", method_defaults(method))
    other = ts.DynamicViT(keep=0.7, layers=(1, 2), preserve=False)
    with pytest.raises(ValueError, match="another method"):
        check_same_method(saved, method_config(other), "run", method_defaults(other))


def test_a_checkpoint_loads_into_its_method_with_other_inference_settings_and_no_other_change():
    trained = ts.SViT(keep=0.7)
    saved, checked = method_config(trained), trained.inference_fields
    for inference in (ts.SViT(keep=0.7, dither=True), ts.SViT(keep=0.7, sampled=True)):
        check_same_method(saved, method_config(inference), "run", method_defaults(inference), checked)
    other = ts.SViT(keep=0.7, dither=True, reactivate=False)
    with pytest.raises(ValueError, match="another method"):
        check_same_method(saved, method_config(other), "run", method_defaults(other), checked)
    assert ts.DynamicViT().inference_fields == frozenset()


def test_resuming_a_method_run_on_other_host_weights_is_refused(tmp_path):
    _train(tmp_path, until=2)
    with pytest.raises(ValueError, match="host with other weights"):
        _train(tmp_path, model=patched_model(seed=1))


def test_resuming_with_another_choice_of_what_is_trained_is_refused(tmp_path):
    _train(tmp_path, until=2)
    with pytest.raises(ValueError, match=r"use TrainConfig\(train='method'\)"):
        _train(tmp_path, train="model")


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, result = _train(tmp_path, until=2)
    previous = trained_state(model)
    real_save_file = tokensieve.train.checkpoint.save_file

    def save_half_then_fail(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:
            handle.truncate(handle.seek(0, 2) // 2)
        raise OSError("no space left on device")

    monkeypatch.setattr(tokensieve.train.checkpoint, "save_file", save_half_then_fail)
    with pytest.raises(OSError, match="no space"):
        _train(tmp_path, model=model)
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path) == result.checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002.safetensors"]
    fresh = patched_model(method_seed=3)
    load_trained(fresh, tmp_path)
    for key, value in previous.items():
        assert torch.equal(value, trained_state(fresh)[key]), key
    _, resumed = _train(tmp_path, model=fresh)
    assert resumed.resumed_from == result.checkpoint and resumed.step == 4


@pytest.mark.parametrize("target", ["step-00000003.safetensors", "latest"])
def test_a_writer_killed_midway_leaves_the_previous_checkpoint_intact(tmp_path, target):
    """A process SIGKILLed while writing (no clean-up at all) leaves only a hidden temporary file."""
    _, result = _train(tmp_path, until=2)
    # The writer imports atomic.py alone (it needs only the standard library), then dies mid-write.
    script = (
        "import importlib.util, os, signal, sys\n"
        "spec = importlib.util.spec_from_file_location('atomic', sys.argv[1])\n"
        "atomic = importlib.util.module_from_spec(spec); spec.loader.exec_module(atomic)\n"
        "def write(tmp):\n"
        "    with open(tmp, 'wb') as handle:\n"
        "        handle.write(b'partial bytes'); handle.flush()\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic.atomic_write(atomic.Path(sys.argv[2]), write)\n"
    )
    writer = subprocess.run([sys.executable, "-c", script, tokensieve.train.atomic.__file__,
                             str(tmp_path / target)], timeout=60)
    assert writer.returncode == -signal.SIGKILL

    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{target}.tmp-")]
    assert len(leftovers) == 1
    assert latest_checkpoint(tmp_path) == result.checkpoint
    assert not (tmp_path / "step-00000003.safetensors").exists()
    assert (tmp_path / "latest").read_text() == "step-00000002.safetensors\n"
    load_trained(patched_model(method_seed=3), tmp_path)
    _, resumed = _train(tmp_path, model=patched_model(method_seed=3))
    assert resumed.resumed_from == result.checkpoint and resumed.step == 4
    assert latest_checkpoint(tmp_path).name == "step-00000004.safetensors"


def test_old_checkpoints_are_removed_beyond_keep_checkpoints(tmp_path):
    _train(tmp_path, checkpoint_every=1, keep_checkpoints=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step-00000003.safetensors", "step-00000004.safetensors"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000004.safetensors"


def test_a_file_that_is_not_a_training_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a tokensieve training checkpoint"):
        load_trained(patched_model(), path)


def _damage(path, how):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\0" * 64 + data[64:])


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_resuming_past_a_damaged_latest_checkpoint_takes_the_previous_one_with_a_warning(tmp_path, how):
    _train(tmp_path, until=3, checkpoint_every=1)  # keeps steps 2 and 3
    _damage(tmp_path / "step-00000003.safetensors", how)
    with pytest.warns(UserWarning, match=r"step-00000003\.safetensors cannot be read.*resuming from "
                                         r".*step-00000002\.safetensors"):
        _, result = _train(tmp_path, checkpoint_every=1)
    assert result.resumed_from == tmp_path / "step-00000002.safetensors"
    assert [record.step for record in result.history] == [3, 4] and result.step == 4
    assert read_checkpoint(tmp_path / "step-00000003.safetensors")[1]["step"] == "3"  # written again


def test_a_damaged_checkpoint_is_named_when_it_is_loaded(tmp_path):
    _, result = _train(tmp_path, until=2)
    _damage(result.checkpoint, "truncated")
    named = rf"{re.escape(str(result.checkpoint))} cannot be read: it is truncated or corrupt"
    with pytest.raises(ValueError, match=named):
        load_trained(patched_model(), tmp_path)
    with pytest.raises(ValueError, match=named):
        read_checkpoint(result.checkpoint)


def test_resuming_where_no_checkpoint_can_be_read_is_refused_naming_them(tmp_path):
    _train(tmp_path, until=2, checkpoint_every=1)
    for name in ("step-00000001.safetensors", "step-00000002.safetensors"):
        _damage(tmp_path / name, "truncated")
    with pytest.raises(ValueError, match=r"no checkpoint in .* can be read \(step-00000002\.safetensors, "
                                         r"step-00000001\.safetensors\).*resume=False"):
        _train(tmp_path)


@pytest.mark.parametrize("inside", [False, True])
def test_a_checkpoint_dir_that_is_a_file_is_refused_before_any_step(tmp_path, inside):
    afile = tmp_path / "run"
    afile.write_text("not a directory")
    steps = []

    def counting_loss(logits, targets):
        steps.append(1)
        return cross_entropy(logits, targets)

    directory = afile / "sub" if inside else afile
    with pytest.raises(ValueError, match=rf"{re.escape(str(afile))} is a file.*pass a directory"):
        fit(patched_model(), random_dataset(16), counting_loss,
            quiet_config(steps=2, checkpoint_dir=str(directory)))
    assert steps == []


def test_a_saved_host_identity_matches_across_json_and_a_spec_field_added_since():
    from tokensieve.spec import ModelSpec
    from tokensieve.train.identity import check_same_host, host_identity

    model = torch.nn.Linear(2, 2)
    spec = ModelSpec(family="SAM", depth=4, dim=8, num_heads=2, head_dim=4, prefix=0, has_class_token=False,
                     input_tokens=16, image_size=32, dense_only=True, global_blocks=(1, 3))
    current = host_identity(model, [spec])
    saved = json.loads(json.dumps(current))  # as a checkpoint holds it: tuples become lists
    check_same_host(saved, current, "run")
    plain = dataclasses.replace(spec, global_blocks=())
    older = json.loads(json.dumps(host_identity(model, [plain])))
    del older["spec"]["global_blocks"]  # written before ModelSpec had the field
    check_same_host(older, host_identity(model, [plain]), "run")
    with pytest.raises(ValueError, match="trained on another model"):
        check_same_host(older, current, "run")
