"""patch / unpatch: in place, reversible, idempotent, never stacked; weights and keys untouched."""

import copy

import pytest
import torch
from models import blocks_of, forward, host_model, images, max_difference
from registry import host_methods

import tokensieve as ts

HOSTS = ["timm-deit3", "DeiTForImageClassificationWithTeacher", "Dinov2WithRegistersForImageClassification"]
COPY_HOSTS = ["timm-vit", "ViTForImageClassification"]


def _snapshot(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def _assert_same_state(model, snapshot):
    state = model.state_dict()
    assert list(state) == list(snapshot)
    for key, value in state.items():
        assert torch.equal(value, snapshot[key]), key


def _assert_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize(("host", "method"), host_methods(HOSTS, "pruned", "ragged"))
def test_patch_then_unpatch_restores_the_model_exactly(host, method):
    model = host_model(host)
    x = images(2)
    before, expected = _snapshot(model), forward(model, x)
    ts.patch(model, method)
    assert ts.is_patched(model)
    _assert_same_state(model, before)  # patching adds no state-dict keys, not even the predictors'
    assert forward(model, x).keys() == expected.keys()
    ts.unpatch(model)
    assert not ts.is_patched(model)
    _assert_same_state(model, before)
    assert all("forward" not in vars(block) for block in model.modules())
    got = forward(model, x)
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_patch_leaves_parameters_and_module_tree_alone():
    model = host_model("timm-vit")
    names = [name for name, _ in model.named_modules()]
    parameters = list(model.parameters())
    sieve = ts.patch(model, ts.DynamicViT(keep=0.5, layers=(1,)))
    assert [name for name, _ in model.named_modules()] == names
    assert list(model.parameters()) == parameters
    assert not set(map(id, sieve.parameters())) & set(map(id, parameters))


def test_sieve_of_returns_the_sieve_patch_returned():
    model = host_model("timm-vit")
    sieve = ts.patch(model, ts.EViT(keep=0.5, layers=(1,)))
    assert ts.sieve_of(model) is sieve
    assert sieve.method == ts.EViT(keep=0.5, layers=(1,))


@pytest.mark.parametrize("host", ["timm-vit", "ViTForImageClassification"])
def test_patching_twice_runs_only_the_second_method(host):
    second = ts.EViT(keep=0.5, layers=(2,))
    model = host_model(host)
    ts.patch(model, ts.TopK(keep=0.5, layers=(1,)))
    ts.patch(model, second)
    once = host_model(host)
    ts.patch(once, second)
    x = images(2)
    with ts.trace(model) as traces:
        got = forward(model, x)
    with ts.trace(once) as expected_traces:
        expected = forward(once, x)
    assert len(traces) == 1
    assert traces[0].kept_tokens().tolist() == expected_traces[0].kept_tokens().tolist()
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert ts.sieve_of(model).method == second
    ts.unpatch(model)
    assert not ts.is_patched(model)
    assert all("forward" not in vars(block) for block in blocks_of(model))


def test_trace_of_the_first_patch_stops_collecting_after_a_repatch():
    model = host_model("timm-vit")
    ts.patch(model, ts.TopK(keep=0.5, layers=(1,)))
    with ts.trace(model) as traces:
        ts.patch(model, ts.ToMe(r=2))
        with ts.trace(model) as new_traces:
            forward(model, images(1))
    assert len(new_traces) == 1
    assert traces == []


def test_unpatch_of_an_unpatched_model_is_a_no_op():
    model = host_model("timm-vit")
    x = images(2)
    before, expected = _snapshot(model), forward(model, x)
    ts.unpatch(model)
    ts.unpatch(model)
    assert not ts.is_patched(model)
    _assert_same_state(model, before)
    assert torch.equal(forward(model, x)["out"], expected["out"])
    ts.patch(model, ts.ToMe(r=2))
    ts.unpatch(model)
    ts.unpatch(model)
    assert torch.equal(forward(model, x)["out"], expected["out"])


def test_sieve_of_an_unpatched_model_is_a_value_error():
    with pytest.raises(ValueError, match="not patched"):
        ts.sieve_of(host_model("timm-vit"))


def test_unpatch_restores_a_block_forward_that_was_there_before():
    model = host_model("timm-vit")
    block = blocks_of(model)[1]
    calls = []

    def counting_forward(*args, original=block.forward, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    block.forward = counting_forward
    ts.patch(model, ts.EViT(keep=0.5, layers=(2,)))
    ts.unpatch(model)
    forward(model, images(1))
    assert vars(block).get("forward") is counting_forward
    assert calls == [1]


@pytest.mark.parametrize(("host", "method"), host_methods(COPY_HOSTS, "pruned", "ragged"))
def test_a_deep_copy_of_a_patched_model_is_patched_alike_and_independent(host, method):
    model = host_model(host)
    sieve = ts.patch(model, method)
    x = images(2)
    expected = forward(model, x)
    clone = copy.deepcopy(model)
    assert ts.is_patched(clone) and ts.sieve_of(clone).method == method
    _assert_equal(forward(clone, x), expected)
    assert not set(map(id, ts.sieve_of(clone).parameters())) & set(map(id, sieve.parameters()))
    with torch.no_grad():  # the copy runs its own weights, and the model keeps its own
        for param in [*blocks_of(clone)[-1].parameters(), *ts.sieve_of(clone).parameters()]:
            param.mul_(2.0)
    assert max_difference(forward(clone, x), expected) > 1e-4
    _assert_equal(forward(model, x), expected)
    ts.unpatch(clone)
    assert ts.is_patched(model)
    assert all("forward" not in vars(block) for block in blocks_of(clone))
    _assert_equal(forward(model, x), expected)


@pytest.mark.parametrize(("host", "method"), host_methods(COPY_HOSTS, "pruned", "ragged"))
def test_host_and_method_state_dicts_stay_apart_and_reload(host, method):
    model = host_model(host)
    keys = list(model.state_dict())
    sieve = ts.patch(model, method)
    assert list(model.state_dict()) == keys  # the host's checkpoints keep their keys
    state = sieve.state_dict()
    own = {name for name, _ in sieve.named_parameters()} | {name for name, _ in sieve.named_buffers()}
    assert set(state) == own  # the method's parameters only, none of the host's
    host_tensors = {tensor.data_ptr() for tensor in model.state_dict().values()}
    assert not any(tensor.data_ptr() in host_tensors for tensor in state.values())
    x = images(2)
    expected = forward(model, x)
    fresh = host_model(host, seed=1)
    fresh.load_state_dict(model.state_dict())
    fresh_sieve = ts.patch(fresh, method)
    if state:  # a fresh patch draws its own parameters, so reloading has something to do
        assert any(not torch.equal(value, fresh_sieve.state_dict()[key]) for key, value in state.items())
    fresh_sieve.load_state_dict(state)
    _assert_equal(forward(fresh, x), expected)


def test_pruning_disabled_gives_the_host_output_and_restores_pruning():
    model = host_model("timm-deit3")
    x = images(2)
    expected = forward(model, x)
    ts.patch(model, ts.EViT(keep=0.5, layers=(1, 2)))
    pruned = forward(model, x)
    with ts.pruning_disabled(model), ts.trace(model) as traces:
        dense = forward(model, x)
    assert max_difference(dense, expected) <= 1e-5
    assert traces[0].kept_tokens()[-1].tolist() == [traces[0].input_tokens] * 2
    assert torch.equal(forward(model, x)["out"], pruned["out"])
