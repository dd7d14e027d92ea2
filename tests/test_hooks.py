"""Forward hooks on patched blocks: a hook that observes sees what the block returns (every input
position in dense mode); a hook that returns a tensor replaces the block's output, and the call
carries on with it (token state, merged sizes, the dense grid)."""

import pytest
import torch
from models import PATCHES, blocks_of, hf_model, images, strengthen, timm_model

import tokensieve as ts

HOOKED = 1  # the block whose output the hooks see
METHODS = [pytest.param(ts.TopK(keep=0.5, layers=(1, 2)), id="topk"), pytest.param(ts.ToMe(r=8), id="tome")]
MODES = [pytest.param(False, id="sparse"), pytest.param(True, id="dense")]


def _model(method, dense):
    model = strengthen(timm_model("timm-vit"))
    model.norm = torch.nn.Identity()  # forward_features then returns the last block's output
    ts.patch(model, method, dense=dense)
    return model


def _run(model, x):
    with torch.no_grad(), ts.trace(model) as traces:
        return model.forward_features(x), traces[0]


def _hooked(model, x, hook):
    handle = blocks_of(model)[HOOKED].register_forward_hook(hook)
    try:
        return _run(model, x)
    finally:
        handle.remove()


@pytest.mark.parametrize("dense", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_a_hook_that_observes_sees_the_blocks_output_and_changes_nothing(method, dense):
    model = _model(method, dense)
    x = images(2)
    expected, expected_trace = _run(model, x)
    seen = []
    got, _ = _hooked(model, x, lambda module, args, out: seen.append(out.shape))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    tokens = PATCHES + 1 if dense else int(expected_trace.kept_tokens()[HOOKED, 0])
    assert seen == [torch.Size([2, tokens, model.embed_dim])]


@pytest.mark.parametrize("dense", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_a_hook_that_returns_a_new_tensor_of_the_same_values_changes_nothing(method, dense):
    model = _model(method, dense)
    x = images(2)
    expected, expected_trace = _run(model, x)
    got, trace = _hooked(model, x, lambda module, args, out: out * 1.0)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert trace.kept_tokens().tolist() == expected_trace.kept_tokens().tolist()
    for record, expected_record in zip(trace.layers, expected_trace.layers, strict=True):
        assert torch.equal(record.index, expected_record.index)


@pytest.mark.parametrize("dense", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_a_hook_that_shifts_the_output_equals_shifting_the_blocks_last_bias(method, dense):
    model = _model(method, dense)
    x = images(2)
    shift = torch.randn(model.embed_dim, generator=torch.Generator().manual_seed(3))
    got, trace = _hooked(model, x, lambda module, args, out: out + shift)
    with torch.no_grad():  # the timm block's output is x + ... + fc2(...): its bias adds to every token
        model.blocks[HOOKED].mlp.fc2.bias += shift
    expected, expected_trace = _run(model, x)
    assert trace.kept_tokens().tolist() == expected_trace.kept_tokens().tolist()
    if dense and method.keeps_positions:  # the hook also shifts the tokens frozen by then
        for i in range(2):
            frozen = torch.ones(PATCHES + 1, dtype=torch.bool)
            frozen[trace.layers[HOOKED].index[i]] = False
            assert frozen.any()
            expected[i, frozen] += shift
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dense", MODES)
def test_a_hook_that_changes_the_token_count_is_refused(dense):
    model = _model(ts.TopK(keep=0.5, layers=(1, 2)), dense)
    with pytest.raises(ValueError, match="hook"):
        _hooked(model, images(2), lambda module, args, out: out[:, :-1])


@pytest.mark.parametrize("dense", MODES)
def test_a_hook_on_a_transformers_layer_keeps_the_chain(dense):
    model = strengthen(hf_model("ViTModel"))
    ts.patch(model, ts.ToMe(r=8), dense=dense)
    x = images(2)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state
        blocks_of(model)[HOOKED].register_forward_hook(lambda module, args, out: out.clone())
        got = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
