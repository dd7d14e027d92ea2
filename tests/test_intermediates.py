"""Intermediate features: in dense mode every block returns every input position, so timm's
forward_intermediates / get_intermediate_layers and transformers' output_hidden_states read whole
maps; a sparse patch refuses timm's intermediates, and its hidden states are the kept tokens."""

import pytest
import torch
from models import DEPTH, IMAGE, PATCH, PATCHES, hf_model, images, sam_model, strengthen, timm_model
from registry import methods

import tokensieve as ts

GRID = IMAGE // PATCH
ALL_BLOCKS = list(range(DEPTH))


def _intermediates(model, x, **kwargs):
    with torch.no_grad():
        return model.forward_intermediates(x, indices=ALL_BLOCKS, intermediates_only=True, **kwargs)


@pytest.mark.parametrize("method", methods("off"))
def test_dense_intermediates_with_pruning_off_equal_the_hosts(method):
    model = timm_model("timm-deit3")
    x = images(2)
    expected = _intermediates(model, x)
    ts.patch(model, method, dense=True)
    for got, want in zip(_intermediates(model, x), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", methods("pruned", "ragged"))
def test_dense_intermediates_are_whole_maps_and_a_dropped_token_keeps_its_features(method):
    model = strengthen(timm_model("timm-vit"))
    ts.patch(model, method, dense=True)
    x = images(2)
    with ts.trace(model) as traces:
        maps = _intermediates(model, x)
    assert [tuple(m.shape) for m in maps] == [(2, model.embed_dim, GRID, GRID)] * DEPTH
    with torch.no_grad():
        final = model.forward_features(x)[:, model.num_prefix_tokens:]  # after the norm
    last = maps[-1].flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.norm(last), final, atol=1e-5, rtol=0)
    # preserve=False (SViT's and DynamicViT's "discard"): a dropped token's cell of the last map is zeros
    discards = isinstance(method, (ts.SViT, ts.DynamicViT)) and not method.preserve
    if method.keeps_positions:  # a token out of block i holds its features in every later map until it
        records = traces[0].layers  # is active again (a method that reactivates tokens may bring it back)
        for layer in range(len(records) - 1):
            for i in range(2):
                frozen = torch.ones(PATCHES + 1, dtype=torch.bool)
                for later in range(layer, len(records)):
                    index = records[later].index[i]
                    frozen[index[index >= 0]] = False
                    got = maps[later].flatten(2)[i, :, frozen[1:]]  # no class token
                    held = maps[layer].flatten(2)[i, :, frozen[1:]]
                    if discards and later == len(records) - 1:
                        held = torch.zeros_like(held)
                    torch.testing.assert_close(got, held, atol=0, rtol=0)


def test_get_intermediate_layers_reshaped_in_dense_mode_are_whole_maps():
    model = timm_model("timm-vit")
    ts.patch(model, ts.ToMe(r=4), dense=True)
    with torch.no_grad():
        maps = model.get_intermediate_layers(images(2), n=2, reshape=True)
    assert [tuple(m.shape) for m in maps] == [(2, model.embed_dim, GRID, GRID)] * 2


def test_intermediates_of_a_sparse_patch_are_refused_naming_dense():
    model = timm_model("timm-vit")
    ts.patch(model, ts.TopK(keep=0.5, layers=(1, 2)))
    with pytest.raises(ValueError, match="dense=True"):
        model.forward_intermediates(images(2), indices=[1, 2], intermediates_only=True)
    with pytest.raises(ValueError, match="dense=True"):
        model.get_intermediate_layers(images(2), n=2, reshape=True)


def test_intermediates_of_a_sparse_patch_with_pruning_disabled_equal_the_hosts():
    model = timm_model("timm-vit")
    x = images(2)
    expected = _intermediates(model, x)
    ts.patch(model, ts.TopK(keep=0.5, layers=(1, 2)))
    with ts.pruning_disabled(model):
        got = _intermediates(model, x)
    for got_map, want in zip(got, expected, strict=True):
        torch.testing.assert_close(got_map, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="dense=True"):  # pruning on again
        _intermediates(model, x)


def test_an_instance_override_of_the_intermediates_runs_with_pruning_disabled_and_survives_unpatch():
    model = timm_model("timm-vit")

    def own(*args, **kwargs):
        return "own"

    model.forward_intermediates = own
    ts.patch(model, ts.TopK(keep=0.5, layers=(1, 2)))
    with ts.pruning_disabled(model):
        assert model.forward_intermediates(images(2)) == "own"
    ts.unpatch(model)
    assert model.forward_intermediates is own


def test_unpatching_restores_the_intermediates():
    model = timm_model("timm-vit")
    x = images(2)
    expected = _intermediates(model, x)
    ts.patch(model, ts.TopK(keep=0.5, layers=(1, 2)))
    ts.unpatch(model)
    for got, want in zip(_intermediates(model, x), expected, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def _hidden_states(model, x):
    with torch.no_grad():
        return model(pixel_values=x, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("method", methods("off"))
@pytest.mark.parametrize("host", ["ViTModel", "Dinov2WithRegistersModel"])
def test_dense_hidden_states_with_pruning_off_equal_the_hosts(host, method):
    model = hf_model(host)
    x = images(2)
    expected = _hidden_states(model, x)
    ts.patch(model, method, dense=True)
    for got, want in zip(_hidden_states(model, x), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", methods("pruned"))
def test_dense_hidden_states_hold_every_position_and_the_last_is_the_output(method):
    model = strengthen(hf_model("ViTModel"))
    ts.patch(model, method, dense=True)
    x = images(2)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, PATCHES + 1, 64)] * (DEPTH + 1)
    last = model.layernorm(out.hidden_states[-1])
    torch.testing.assert_close(last, out.last_hidden_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", methods("pruned"))
def test_sparse_hidden_states_are_the_tokens_each_block_kept(method):
    model = strengthen(hf_model("ViTModel"))
    ts.patch(model, method)
    with ts.trace(model) as traces:
        hidden = _hidden_states(model, images(2))
    assert [h.shape[1] for h in hidden[1:]] == traces[0].kept_tokens()[:, 0].tolist()


def test_sam_hidden_states_are_whole_maps_with_pruning_off_equal_to_the_hosts():
    model = sam_model()
    x = images(2)
    expected = _hidden_states(model, x)
    ts.patch(model, ts.DynamicViT(keep=1.0, layers=(1, 2)))
    got = _hidden_states(model, x)
    assert len(got) == len(expected)
    for h, want in zip(got, expected, strict=True):
        torch.testing.assert_close(h, want, atol=1e-5, rtol=0)
