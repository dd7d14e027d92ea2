"""Dense mode: every input position comes out, pruned ones with the features they had when pruned."""

import pytest
import torch
from models import PATCHES, distinct_images, forward, host_model, images, max_difference, strengthen
from registry import host_methods, methods

import tokensieve as ts


@pytest.mark.parametrize(("host", "method"), host_methods(
    ["timm-deit3", "Dinov2WithRegistersModel", "CLIPVisionModel"], "off"))
def test_dense_patched_with_pruning_off_equals_host(host, method):
    model = host_model(host)
    x = images(2)
    expected = forward(model, x)
    ts.patch(model, method, dense=True)
    assert max_difference(forward(model, x), expected) <= 1e-5


def _features(model, x):
    with torch.no_grad():
        return model.forward_features(x)


KEEPING_POSITIONS = [  # every registered method whose tokens each continue one input position (ToMe: below)
    *[param for param in methods("pruned", "ragged") if param.values[0].keeps_positions],
    pytest.param(ts.DynamicViT(keep=0.6, layers=(1, 3)), id="dynamicvit-before-the-last-block"),
]


@pytest.mark.parametrize("method", KEEPING_POSITIONS)
def test_dense_output_holds_the_active_tokens_of_the_pruned_run_at_their_positions(method):
    model = strengthen(host_model("timm-vit"))
    x = distinct_images()
    sieve = ts.patch(model, method)
    with ts.trace(model) as traces:
        pruned = _features(model, x)
    ts.patch(model, method, dense=True).load_state_dict(sieve.state_dict())
    dense = _features(model, x)
    assert dense.shape[:2] == (3, traces[0].input_tokens)
    last = traces[0].layers[-1]
    for i in range(3):
        rows = last.index[i] >= 0  # not the fused token
        if last.valid is not None:
            rows &= last.valid[i]
        torch.testing.assert_close(dense[i, last.index[i][rows]], pruned[i][rows], atol=1e-5, rtol=0)


def _embedded(model, x):
    """The timm host's tokens entering block 0."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


def _assert_dropped_tokens_equal(dense, expected, kept):
    """Every position not in `kept` ([B, K]) has the expected features; some positions were dropped."""
    for i in range(dense.shape[0]):
        dropped = torch.ones(dense.shape[1], dtype=torch.bool)
        dropped[kept[i]] = False
        assert dropped.sum() > 0
        torch.testing.assert_close(dense[i, dropped], expected[i, dropped], atol=1e-5, rtol=0)


def test_tokens_dropped_after_attention_keep_their_post_attention_features():
    model = strengthen(host_model("timm-vit"))
    x = images(2)
    ts.patch(model, ts.TopK(keep=0.5, layers=(1,)), dense=True)
    with ts.trace(model) as traces:
        dense = _features(model, x)
    ts.unpatch(model)
    with torch.no_grad():  # the host's own computation up to block 1's attention
        h = model.blocks[0](_embedded(model, x))
        block = model.blocks[1]
        h = h + block.drop_path1(block.ls1(block.attn(block.norm1(h))))
        expected = model.norm(h)
    _assert_dropped_tokens_equal(dense, expected, traces[0].layers[1].index)  # kept: went on to the MLP


def test_tokens_dropped_before_a_block_keep_the_previous_block_output():
    model = strengthen(host_model("timm-vit"))
    x = images(2)
    ts.patch(model, ts.DynamicViT(keep=0.5, layers=(2,)), dense=True)
    with ts.trace(model) as traces:
        dense = _features(model, x)
    ts.unpatch(model)
    with torch.no_grad():
        expected = model.norm(model.blocks[1](model.blocks[0](_embedded(model, x))))
    _assert_dropped_tokens_equal(dense, expected, traces[0].layers[2].index)


def test_transformers_model_in_dense_mode_returns_the_full_sequence():
    model = host_model("ViTModel")
    x = images(2)
    ts.patch(model, ts.EViT(keep=0.5, layers=(1, 2)), dense=True)
    with torch.no_grad():
        out = model(pixel_values=x)
    assert out.last_hidden_state.shape[1] == 65


def test_dense_mode_copies_each_merged_token_back_to_every_position_it_stands_for():
    model = host_model("ViTModel")
    method = ts.ToMe(r=6)
    x = images(2)
    ts.patch(model, method)
    merged = forward(model, x)["last_hidden_state"]  # [B, N - merged, C]
    ts.patch(model, method, dense=True)
    dense = forward(model, x)["last_hidden_state"]
    assert dense.shape == (2, PATCHES + 1, merged.shape[-1]) and merged.shape[1] < PATCHES + 1
    for sample in range(2):
        # every position holds one of the merged tokens, and every merged token is somewhere
        match = (dense[sample, :, None] - merged[sample, None]).abs().amax(dim=-1).lt(1e-5)  # [N, N - merged]
        assert match.sum(dim=1).eq(1).all()
        assert match.sum(dim=0).ge(1).all()
        assert match[0, 0]  # the class token stays itself
        assert match.sum(dim=0).gt(1).sum() > 0  # some tokens stand for several positions
