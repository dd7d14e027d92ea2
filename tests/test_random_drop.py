"""RandomDrop: the random-pruning control of the benchmark tables."""

import pytest
import torch
from models import DEPTH, PATCHES, forward, host_model, images

import tokensieve as ts

METHOD = ts.RandomDrop(keep=0.5, layers=(2,))


def _kept_positions(model, x):
    with ts.trace(model) as traces:
        forward(model, x)
    record = traces[0].layers[-1]
    return record.index[:, 1:], traces[0]


def test_random_drop_keeps_half_of_the_patches_from_its_layer_on_and_repeats_its_draw():
    model = host_model("ViTForImageClassification")
    ts.patch(model, METHOD)
    x = images(3)
    first, trace = _kept_positions(model, x)
    kept = trace.kept_tokens()  # [layers, images]
    assert kept[:2].eq(PATCHES + 1).all()
    assert kept[2:].eq(PATCHES // 2 + 1).all()
    again, _ = _kept_positions(model, x)
    assert torch.equal(first, again)  # the same choice at every call
    # the draw depends on the seed, the layer and the image's own tokens, not on its row in the batch
    assert torch.equal(first[0], first[1])
    ts.patch(model, ts.RandomDrop(keep=0.5, layers=(2,), seed=1))
    other, _ = _kept_positions(model, x)
    assert not torch.equal(first, other)


def test_random_drop_gives_each_image_of_a_batch_the_output_it_gets_alone():
    model = host_model("ViTForImageClassification")
    ts.patch(model, METHOD)
    x = images(3)
    batch = forward(model, x)["logits"]
    for i in range(len(x)):
        alone = forward(model, x[i : i + 1])["logits"]
        torch.testing.assert_close(batch[i], alone[0], atol=1e-5, rtol=0)


def test_random_drop_draws_the_same_tokens_in_training_as_in_eval():
    model = host_model("ViTModel")
    ts.patch(model, METHOD)
    x = images(2)
    evaluated, _ = _kept_positions(model, x)
    model.train()
    trained, _ = _kept_positions(model, x)
    assert torch.equal(trained, evaluated)


def test_random_drop_in_dense_mode_freezes_the_dropped_tokens_in_place():
    model = host_model("ViTModel")
    ts.patch(model, ts.RandomDrop(keep=0.5, layers=(DEPTH - 1,)), dense=True)
    x = images(2)
    pruned = forward(model, x)["last_hidden_state"]
    with ts.pruning_disabled(model), torch.no_grad():
        dense = model(x, output_hidden_states=True)
    # a dropped token leaves the encoder with the features it had before the last block
    frozen = model.layernorm(dense.hidden_states[-2])
    assert pruned.shape == dense.last_hidden_state.shape
    kept, _ = _kept_positions(model, x)
    for sample in range(2):
        dropped = sorted(set(range(1, PATCHES + 1)) - set(kept[sample].tolist()))
        assert len(dropped) == PATCHES // 2
        assert torch.allclose(pruned[sample, dropped], frozen[sample, dropped], atol=1e-5)


def test_random_drop_rejects_a_keep_outside_the_unit_interval():
    with pytest.raises(ValueError, match="keep"):
        ts.patch(host_model("ViTModel"), ts.RandomDrop(keep=0.0))
