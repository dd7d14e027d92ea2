"""fit takes the data and models people have: transformers models called with keyword inputs
and returning a ModelOutput, a method patched on a part of a task model, iterables of batches,
functions of the epoch, and epochs instead of steps."""

import pytest
import torch
import transformers
from test_train_support import CLASSES, DYNAMICVIT, IMAGE, PATCH, patched_model, quiet_config, random_dataset

import tokensieve as ts
from tokensieve.train import cross_entropy, fit, read_log


def _hf_classifier() -> transformers.ViTForImageClassification:
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=32, num_hidden_layers=4,
                                    num_attention_heads=2, intermediate_size=64, num_labels=CLASSES)
    return transformers.ViTForImageClassification(config)


def _keyword_batches(batches: int = 3):
    images, labels = random_dataset(8 * batches).tensors
    return [({"pixel_values": images[i : i + 8]}, labels[i : i + 8]) for i in range(0, 8 * batches, 8)]


def test_a_transformers_model_trains_from_keyword_inputs_and_its_output_logits():
    model = _hf_classifier()
    sieve = ts.patch(model, DYNAMICVIT)
    before = {k: v.clone() for k, v in sieve.state_dict().items()}
    result = fit(model, _keyword_batches(), cross_entropy, quiet_config(steps=3))
    assert len(result.history) == 3 and result.history[0].keep_per_stage is not None
    assert any(not torch.equal(before[k], v) for k, v in sieve.state_dict().items())


def test_a_method_patched_on_the_encoder_of_a_task_model_is_found_and_trained():
    model = _hf_classifier()
    sieve = ts.patch(model.vit, DYNAMICVIT)  # the backbone inside the classifier
    head_before = model.classifier.weight.clone()
    result = fit(model, _keyword_batches(), cross_entropy, quiet_config(steps=2))
    assert result.history[-1].keep_per_stage is not None
    assert all(p.grad is not None for p in sieve.parameters())
    assert torch.equal(model.classifier.weight, head_before)  # train="method": the host stays


def test_two_patched_parts_need_the_sieve_named():
    model = _hf_classifier()
    ts.patch(model, DYNAMICVIT)
    sieve = ts.patch(model.vit, DYNAMICVIT)
    with pytest.raises(ValueError, match="pass sieve="):
        fit(model, _keyword_batches(), cross_entropy, quiet_config(steps=1))
    with pytest.raises(ValueError, match="not attached"):
        fit(patched_model(), random_dataset(8), cross_entropy, quiet_config(steps=1), sieve=sieve)


def test_epochs_count_whole_passes_over_a_dataset(tmp_path):
    log = tmp_path / "log.jsonl"
    config = quiet_config(steps=None, epochs=2, log_path=str(log))
    fit(patched_model(), random_dataset(20), cross_entropy, config)
    assert [line["epoch"] for line in read_log(log)] == [0, 0, 1, 1]  # 20 samples: 2 full batches of 8


def test_an_iterable_is_iterated_again_each_epoch_and_resume_skips_the_batches_done(tmp_path):
    batches = [(inputs["pixel_values"], labels) for inputs, labels in _keyword_batches()]
    straight = patched_model(method_seed=1)
    fit(straight, batches, cross_entropy, quiet_config(steps=5, log_path=str(tmp_path / "a.jsonl")))
    config = quiet_config(steps=5, checkpoint_dir=str(tmp_path / "run"), log_path=str(tmp_path / "b.jsonl"))
    fit(patched_model(method_seed=1), batches, cross_entropy, config, until=2)
    resumed = patched_model(method_seed=2)
    fit(resumed, batches, cross_entropy, config)

    def losses(path):
        return [(line["step"], line["epoch"], line["loss"]) for line in read_log(path)]

    assert losses(tmp_path / "b.jsonl") == losses(tmp_path / "a.jsonl")
    assert [epoch for _, epoch, _ in losses(tmp_path / "a.jsonl")] == [0, 0, 0, 1, 1]


def test_a_function_of_the_epoch_gives_each_epochs_batches():
    asked = []

    def batches_of(epoch):
        asked.append(epoch)
        images, labels = random_dataset(16, seed=epoch).tensors
        return iter([(images[:8], labels[:8]), (images[8:], labels[8:])])

    result = fit(patched_model(), batches_of, cross_entropy, quiet_config(steps=5))
    assert asked == [0, 1, 2] and [r.epoch for r in result.history] == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="known length"):
        fit(patched_model(), batches_of, cross_entropy, quiet_config(steps=None, epochs=1))
