"""No state leaks between calls: batch size, image size, entry point and failed calls do not
change the next call's result."""

import pytest
import torch
from models import blocks_of, forward, host_model, images, patched_copy, strengthen
from registry import host_methods, methods

import tokensieve as ts

# (batch, height, width, entry point): alternating shapes and entry points
CALLS = [(1, 64, 64, 0), (3, 48, 80, 1), (2, 80, 48, 0), (3, 64, 64, 1), (1, 48, 48, 0), (2, 64, 64, 1)]

# host -> (build overrides for dynamic image sizes, two entry points)
HOSTS = {
    "timm-vit": ({"dynamic_img_size": True}, (
        lambda m, x: forward(m, x),
        lambda m, x: {"out": m.forward_head(m.forward_features(x))},
    )),
    "ViTForImageClassification": ({}, (
        lambda m, x: forward(m, x),
        lambda m, x: forward(m.base_model, x),
    )),
    # Registers and LayerScale; the base model, as ragged methods are refused on mean-pooling heads.
    "Dinov2WithRegistersModel": ({}, (
        lambda m, x: forward(m, x),
        lambda m, x: {"cls": m(pixel_values=x).last_hidden_state[:, 0]},
    )),
}


def _patched(host: str, method: ts.Method):
    overrides, entries = HOSTS[host]
    model = strengthen(host_model(host, **overrides))
    ts.patch(model, method)
    return model, overrides, entries


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize(("host", "method"), host_methods(HOSTS, "pruned", "ragged"))
def test_each_call_equals_a_fresh_patched_copy_whatever_came_before(host, method):
    model, overrides, entries = _patched(host, method)
    for seed, (batch, height, width, entry) in enumerate(CALLS):
        x = images(batch, height, width, seed=seed)
        with torch.no_grad():
            got = entries[entry](model, x)
        with torch.no_grad():
            expected = entries[entry](patched_copy(host, model, **overrides), x)
        _assert_equal(got, expected)


@pytest.mark.parametrize(("host", "method"), host_methods(HOSTS, "pruned", "ragged"))
def test_a_call_after_a_failed_call_is_correct(host, method):
    model, overrides, _ = _patched(host, method)
    x = images(2)
    forward(model, images(3, seed=5))
    with pytest.raises(Exception):  # noqa: B017 - whatever the host raises for four channels
        forward(model, torch.randn(2, 4, 64, 64))
    _assert_equal(forward(model, x), forward(patched_copy(host, model, **overrides), x))


@pytest.mark.parametrize(("host", "method"), host_methods(HOSTS, "pruned", "ragged"))
def test_a_call_after_a_forward_that_failed_between_blocks_is_correct_and_traced_once(host, method):
    model, overrides, _ = _patched(host, method)
    reference = patched_copy(host, model, **overrides)
    x = images(3)

    def fail(module, inputs, output):
        raise RuntimeError("stop after block 2")

    handle = blocks_of(model)[2].register_forward_hook(fail)
    with ts.trace(model) as failed, pytest.raises(RuntimeError, match="stop after block 2"):
        forward(model, images(2, seed=7))
    handle.remove()
    assert failed == []

    with ts.trace(model) as traces:
        got = forward(model, x)
    with ts.trace(reference) as expected_traces:
        expected = forward(reference, x)
    _assert_equal(got, expected)
    assert len(traces) == 1
    assert traces[0].kept_tokens().tolist() == expected_traces[0].kept_tokens().tolist()


@pytest.mark.parametrize("method", [*methods("pruned", "ragged"),
                                    pytest.param(ts.EViT(keep=0.5, layers=(0, 2)), id="evit-from-block-0")])
def test_a_forward_that_stops_early_leaves_nothing_for_the_next_call(method):
    model, _, _ = _patched("timm-vit", method)
    sieve = ts.patch(model, method, dense=True)  # forward_intermediates reads whole maps
    reference = patched_copy("timm-vit", model)
    ts.patch(reference, method, dense=True).load_state_dict(sieve.state_dict())
    x = images(2)
    with torch.no_grad():
        model.forward_intermediates(images(3, seed=3), indices=[1], intermediates_only=True, stop_early=True)
    _assert_equal(forward(model, x), forward(reference, x))
