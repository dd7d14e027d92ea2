"""Resume continues the same run: stopping, building everything anew and resuming gives the
parameters and the logged losses of a run that never stopped."""

import json
import random
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_train_support import DYNAMICVIT, patched_model, quiet_config, random_dataset, trained_state

from tokensieve.train import cross_entropy, finished_steps, fit, read_log

STEPS, STOP = 7, 3  # 5 steps per epoch: the resumed half starts mid-epoch and crosses into the next
# Dropout, drop-path and Gumbel noise all draw random numbers: resume must restore the generators.
NOISY_HOST = dict(drop_rate=0.1, drop_path_rate=0.1)


def _losses(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k != "seconds"} for line in log]


def _perturb_global_generators() -> None:
    torch.manual_seed(12345)
    random.seed(12345)
    np.random.seed(12345)


@pytest.mark.parametrize("train", ["method", "model"])
def test_resumed_run_equals_an_uninterrupted_run(tmp_path, train):
    data = random_dataset(40)
    straight = patched_model(method_seed=1, **NOISY_HOST)
    config = quiet_config(train=train, steps=STEPS, warmup_steps=2, log_path=str(tmp_path / "a.jsonl"))
    fit(straight, data, cross_entropy, config)

    run_dir = tmp_path / "run"
    config = quiet_config(train=train, steps=STEPS, warmup_steps=2, log_path=str(run_dir / "log.jsonl"),
                          checkpoint_dir=str(run_dir))
    first = patched_model(method_seed=1, **NOISY_HOST)
    assert fit(first, data, cross_entropy, config, until=STOP).step == STOP
    del first

    _perturb_global_generators()
    # New objects; the method's weights start elsewhere, and so does the host when it is trained.
    resumed = patched_model(seed=0 if train == "method" else 7, method_seed=99, **NOISY_HOST)
    result = fit(resumed, data, cross_entropy, config)

    assert result.resumed_from is not None and result.resumed_from.name == "step-00000003.safetensors"
    assert result.step == STEPS and [r.step for r in result.history] == list(range(STOP + 1, STEPS + 1))
    expected, actual = trained_state(straight), trained_state(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert _losses(read_log(run_dir / "log.jsonl")) == _losses(read_log(tmp_path / "a.jsonl"))


def test_a_crash_between_checkpoints_repeats_the_lost_steps_exactly(tmp_path):
    data = random_dataset(40)
    straight = patched_model(method_seed=1)
    fit(straight, data, cross_entropy, quiet_config(steps=6, log_path=str(tmp_path / "a.jsonl")))

    config = quiet_config(steps=6, checkpoint_dir=str(tmp_path / "run"), checkpoint_every=2,
                          log_path=str(tmp_path / "run" / "log.jsonl"))
    calls = 0

    def crashing_loss(logits, targets):
        nonlocal calls
        calls += 1
        if calls == 4:  # during step 4: step 3 is logged, the last checkpoint is step 2
            raise RuntimeError("simulated crash")
        return cross_entropy(logits, targets)

    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(patched_model(method_seed=1), data, crashing_loss, config)
    assert [line["step"] for line in read_log(tmp_path / "run" / "log.jsonl")] == [1, 2, 3]

    resumed = patched_model(method_seed=5)
    fit(resumed, data, cross_entropy, config)
    assert _losses(read_log(tmp_path / "run" / "log.jsonl")) == _losses(read_log(tmp_path / "a.jsonl"))
    for key, value in trained_state(straight).items():
        assert torch.equal(value, trained_state(resumed)[key]), key


def test_resume_of_a_finished_run_does_nothing(tmp_path):
    data = random_dataset(16)
    config = quiet_config(steps=2, checkpoint_dir=str(tmp_path))
    model = patched_model()
    fit(model, data, cross_entropy, config)
    before = trained_state(model)
    result = fit(model, data, cross_entropy, config)
    assert result.step == 2 and result.history == []
    for key, value in trained_state(model).items():
        assert torch.equal(value, before[key])


def test_after_step_runs_after_every_step_with_the_runs_count_across_a_resume(tmp_path):
    data = random_dataset(16)
    config = quiet_config(steps=5, checkpoint_dir=str(tmp_path))
    model, seen = patched_model(), []
    assert finished_steps(tmp_path) == 0 and finished_steps(tmp_path / "absent") == 0
    fit(model, data, cross_entropy, config, until=2, after_step=lambda m, step: seen.append((m, step)))
    assert finished_steps(tmp_path) == 2
    fit(model, data, cross_entropy, config, after_step=lambda m, step: seen.append((m, step)))
    assert [step for _, step in seen] == [1, 2, 3, 4, 5]
    assert all(m is model for m, _ in seen)


def test_a_changed_config_on_resume_is_named_in_a_warning(tmp_path):
    data = random_dataset(16)
    fit(patched_model(), data, cross_entropy, quiet_config(steps=4, checkpoint_dir=str(tmp_path)), until=2)
    with pytest.warns(UserWarning, match=r"lr: 0\.001 -> 0\.002"):
        changed = quiet_config(steps=4, lr=2e-3, checkpoint_dir=str(tmp_path))
        fit(patched_model(), data, cross_entropy, changed)


def test_the_hosts_lr_of_a_run_that_trains_the_method_alone_is_not_named(tmp_path):
    data = random_dataset(16)
    fit(patched_model(), data, cross_entropy, quiet_config(steps=4, checkpoint_dir=str(tmp_path)), until=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the host is frozen: its lr changes nothing
        fit(patched_model(), data, cross_entropy,
            quiet_config(steps=4, model_lr_scale=0.5, checkpoint_dir=str(tmp_path)))


def test_a_checkpoint_from_before_a_new_config_field_resumes_without_a_warning(tmp_path):
    data = random_dataset(16)
    result = fit(patched_model(), data, cross_entropy, quiet_config(steps=4, checkpoint_dir=str(tmp_path)),
                 until=2)
    tensors = load_file(result.checkpoint)
    with safe_open(result.checkpoint, "pt") as stored:
        metadata = stored.metadata()
    older = json.loads(metadata["train_config"])
    del older["precision"]  # as written before TrainConfig had it
    save_file(tensors, result.checkpoint, metadata={**metadata, "train_config": json.dumps(older)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = fit(patched_model(), data, cross_entropy,
                      quiet_config(steps=4, checkpoint_dir=str(tmp_path)))
    assert resumed.resumed_from == result.checkpoint and resumed.step == 4


def test_without_resume_a_run_starts_over(tmp_path):
    data = random_dataset(16)
    fit(patched_model(), data, cross_entropy, quiet_config(steps=4, checkpoint_dir=str(tmp_path)), until=2)
    result = fit(patched_model(DYNAMICVIT), data, cross_entropy,
                 quiet_config(steps=4, checkpoint_dir=str(tmp_path), resume=False))
    assert result.resumed_from is None and [r.step for r in result.history] == [1, 2, 3, 4]
