"""fit trains a model that is not patched (train="model", task loss only): the reference models
of tokensieve.tasks are trained this way before any method is attached."""

import pytest
import torch
from test_train_support import easy_dataset, patched_model, quiet_config, tiny_model

from tokensieve.train import cross_entropy, fit, load_trained, read_checkpoint


def _accuracy(model, dataset) -> float:
    images, labels = dataset.tensors
    model.eval()
    with torch.no_grad():
        return (model(images).argmax(-1) == labels).float().mean().item()


def test_an_unpatched_model_learns_with_the_task_loss_alone(tmp_path):
    model, data = tiny_model(), easy_dataset(256)
    before = _accuracy(model, data)
    config = quiet_config(train="model", steps=60, batch_size=32, lr=3e-3, warmup_steps=5,
                          checkpoint_dir=str(tmp_path), log_path=str(tmp_path / "log.jsonl"))
    result = fit(model, data, cross_entropy, config)
    assert all(step.loss_keep_ratio is None and step.loss_distill is None for step in result.history)
    assert all(step.kept_rate == 1.0 for step in result.history)
    assert _accuracy(model, data) > max(0.6, before + 0.3)

    tensors, metadata = read_checkpoint(result.checkpoint)
    assert metadata["method"] == "none"
    assert {k for k in tensors if k.startswith("sieve.")} == set()
    fresh = tiny_model(seed=5)
    load_trained(fresh, tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


def test_an_unpatched_run_resumes_to_the_same_weights(tmp_path):
    data = easy_dataset(64)
    whole = tiny_model()
    fit(whole, data, cross_entropy, quiet_config(train="model", steps=6))
    resumed = tiny_model()
    config = quiet_config(train="model", steps=6, checkpoint_dir=str(tmp_path))
    fit(resumed, data, cross_entropy, config, until=3)
    fit(tiny_model(seed=9), data, cross_entropy, config)  # a fresh process would rebuild the model
    restarted = tiny_model(seed=9)
    load_trained(restarted, tmp_path)
    for key, value in whole.state_dict().items():
        assert torch.equal(value, restarted.state_dict()[key]), key


def test_training_only_the_method_of_an_unpatched_model_is_refused():
    with pytest.raises(ValueError, match=r"not patched.*train='model'"):
        fit(tiny_model(), easy_dataset(16), cross_entropy, quiet_config(train="method"))


def test_a_dense_checkpoint_is_refused_by_a_patched_model(tmp_path):
    fit(tiny_model(), easy_dataset(16), cross_entropy,
        quiet_config(train="model", steps=2, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"trained unpatched"):
        load_trained(patched_model(), tmp_path)
