"""Ragged batches (per-image token counts): each image's result equals running it alone."""

import pytest
import torch
from models import calibrate_predictors, distinct_images, forward, host_model, is_hf, strengthen
from registry import HOSTS, host_methods, methods

import tokensieve as ts

TOLERANCE = 1e-5

RAGGED_HOSTS = [
    "timm-vit",
    "timm-deit-distilled",
    "ViTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
]
MEAN_POOLED = [host for host, traits in HOSTS.items() if traits.mean_pooled]


def _ragged_model(host: str, method: ts.Method, x: torch.Tensor, attention: str = "sdpa"):
    model = strengthen(host_model(host))
    ts.patch(model, method, attention=attention)
    if isinstance(method, ts.DynamicViT):
        calibrate_predictors(model, x)
    if isinstance(method, ts.SViT) and method.ragged:  # thresholds that split an untrained gate's ratings
        ts.calibrate(model, x)
    return model


def _outputs(model, x):
    """The model's outputs and the class token's final features."""
    outputs = forward(model, x)
    with torch.no_grad():
        features = model.base_model(x).last_hidden_state if is_hf(model) else model.forward_features(x)
    return {**outputs, "cls": features[:, 0]}


def _kept(model, x):
    with ts.trace(model) as traces:
        outputs = _outputs(model, x)
    return outputs, traces[0]


def _assert_ragged_batch_equals_each_image_alone(model, x):
    batch, trace = _kept(model, x)
    counts = trace.kept_tokens()  # [L, B]
    if all(layer.unique().numel() == 1 for layer in counts):
        pytest.fail(f"the images keep equal counts {counts.tolist()}: the test would prove nothing")
    for layer, record in enumerate(trace.layers):
        if record.valid is not None:
            assert record.valid.sum(dim=1).tolist() == counts[layer].tolist()
    for i in range(len(x)):
        alone, alone_trace = _kept(model, x[i : i + 1])
        assert alone_trace.kept_tokens()[:, 0].tolist() == counts[:, i].tolist()
        for key in batch:
            torch.testing.assert_close(batch[key][i], alone[key][0], atol=TOLERANCE, rtol=0, msg=key)


@pytest.mark.parametrize(("host", "method"), host_methods(RAGGED_HOSTS, "ragged"))
def test_ragged_batch_equals_each_image_alone(host, method):
    x = distinct_images()
    _assert_ragged_batch_equals_each_image_alone(_ragged_model(host, method, x), x)


@pytest.mark.parametrize("method", methods("ragged"))
def test_ragged_batch_equals_each_image_alone_with_eager_attention(method):
    x = distinct_images()
    _assert_ragged_batch_equals_each_image_alone(_ragged_model("timm-vit", method, x, "eager"), x)


@pytest.mark.parametrize("method", methods("ragged"))
@pytest.mark.parametrize("host", MEAN_POOLED)
def test_ragged_methods_are_refused_on_mean_pooled_heads(host, method):
    """A head that averages the tokens would average the padding of a ragged batch in."""
    with pytest.raises(ValueError, match="fixed keep rate"):
        ts.patch(host_model(host), method)


@pytest.mark.parametrize("method", methods("ragged"))
def test_real_rows_only_equals_running_the_padding_too(method, monkeypatch):
    """Without gradients a ragged batch's token-wise steps skip its padding rows (a whole block
    does when the method reads nothing of its attention); the plain path, which runs them too,
    gives the same outputs."""
    from tokensieve import executor

    x = distinct_images()
    model = _ragged_model("timm-vit", method, x)
    skipping = []  # the steps that ran on real rows alone
    on_rows = executor._on_rows

    def counted_on_rows(step, rows, *tensors):
        if rows is not None:
            skipping.append("token-wise step")
        return on_rows(step, rows, *tensors)

    def counted_block(step):
        def run(*args, **kwargs):
            skipping.append("whole block")
            return step(*args, **kwargs)
        return run

    monkeypatch.setattr(executor, "_on_rows", counted_on_rows)
    monkeypatch.setattr(executor.Runner, "_run_packed", counted_block(executor.Runner._run_packed))
    skipped = _outputs(model, x)
    assert skipping, "the batch took neither path that skips padding"
    monkeypatch.setattr(executor, "_real_rows", lambda state, call: None)
    padded = _outputs(model, x)
    for key in skipped:
        torch.testing.assert_close(skipped[key], padded[key], atol=TOLERANCE, rtol=0, msg=key)


SUMMARY_READERS = [param for param in methods("ragged") if param.values[0].reads_attention_summary(0)]


@pytest.mark.parametrize("method", SUMMARY_READERS)
def test_attention_read_per_sample_equals_the_padded_map_and_each_image_alone(method, monkeypatch):
    """A block whose method reads the attention summary attends each sample over its real rows
    alone when the samples are long; the padded batch's masked map gives the same outputs."""
    from tokensieve import executor

    x = distinct_images()
    model = _ragged_model("timm-vit", method, x)
    per_sample = []
    attend = executor.Runner._attend_rows_with_summary

    def counted(*args):
        per_sample.append(True)
        return attend(*args)

    monkeypatch.setattr(executor.Runner, "_attend_rows_with_summary", counted)
    monkeypatch.setattr(executor, "PER_SAMPLE_MIN_TOKENS", 0)  # the tests' images have few tokens
    _assert_ragged_batch_equals_each_image_alone(model, x)
    assert per_sample, "no block attended per sample"
    by_sample = _outputs(model, x)
    monkeypatch.setattr(executor, "PER_SAMPLE_MIN_TOKENS", 10**6)
    per_sample.clear()
    padded = _outputs(model, x)
    assert not per_sample
    for key in padded:
        torch.testing.assert_close(by_sample[key], padded[key], atol=TOLERANCE, rtol=0, msg=key)
