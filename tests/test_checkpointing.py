"""Activation checkpointing: a patched model whose host recomputes its blocks in the backward pass
(timm's set_grad_checkpointing, transformers' activation_checkpointing_enable) gets the gradients
of the run without checkpointing; reentrant checkpointing, which runs each block without the
token state, is refused naming the fix."""

import contextlib
import functools

import pytest
import timm.layers
import torch
from models import (
    blip_retrieval,
    blocks_of,
    clip_text_model,
    hf_model,
    images,
    sam_model,
    strengthen,
    texts,
    timm_model,
)
from registry import methods
from timm.models import checkpoint_seq
from torch import nn

import tokensieve as ts

TRAINED = methods("pruned", "ragged")  # every registered method and variant, under model.train()


@contextlib.contextmanager
def _timm_reentrant(reentrant: bool):
    """timm's checkpointing mode (a process-wide setting), restored afterwards."""
    before = timm.layers.use_reentrant_ckpt()
    timm.layers.set_reentrant_ckpt(reentrant)
    try:
        yield
    finally:
        timm.layers.set_reentrant_ckpt(before)


def _trained(model):
    """`model` in training mode; its dropouts off, so that runs are comparable."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _gradients(model, run, seed=0):
    """Every gradient of one backward of `run(model)` plus the method's keep decisions (the
    keep-ratio loss reads them from the trace), by parameter name, and the output."""
    sieve = ts.sieve_of(model)
    model.zero_grad(set_to_none=True)
    sieve.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # DynamicViT's Gumbel noise, RandomDrop's draw
    with ts.trace(model) as traces:
        out = run(model)
    loss = out.square().mean()
    for decision in traces[0].keep_decisions:
        loss = loss + decision.decisions.mean()
    loss.backward()
    named = [*model.named_parameters(), *(("sieve." + n, p) for n, p in sieve.named_parameters())]
    return out.detach(), {name: p.grad.clone() for name, p in named if p.grad is not None}


def _assert_checkpointed_layers_keep_the_gradients(model, run):
    """transformers' checkpointing on `model` reruns every layer and leaves the gradients as they were."""
    expected = _gradients(model, run)
    runs = _block_runs(model)
    model.activation_checkpointing_enable()
    got = _gradients(model, run)
    assert len(runs) == 2 * len(blocks_of(model))  # the patch runs the layers through their checkpoint
    _assert_same_gradients(got, expected)


def _assert_same_gradients(got, expected):
    (out, grads), (expected_out, expected_grads) = got, expected
    torch.testing.assert_close(out, expected_out, atol=1e-6, rtol=1e-5)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        error = (grads[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


def _block_runs(model):
    """A counter of how often the blocks' first norm runs (twice per block when checkpointed)."""
    runs = []
    for block in blocks_of(model):
        norm = getattr(block, "norm1", None) or getattr(block, "layernorm_before", None) or block.layer_norm1
        norm.register_forward_hook(lambda module, args, out: runs.append(1))
    return runs


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("method", TRAINED)
def test_timm_checkpointed_blocks_give_the_gradients_of_the_run_without(method, dense):
    model = _trained(strengthen(timm_model("timm-vit")))
    ts.patch(model, method, dense=dense)
    x = images(2)
    expected = _gradients(model, lambda m: m(x) if not dense else m.forward_features(x))
    runs = _block_runs(model)
    model.set_grad_checkpointing(True)
    with _timm_reentrant(False):
        got = _gradients(model, lambda m: m(x) if not dense else m.forward_features(x))
    assert len(runs) == 2 * len(blocks_of(model))  # each block ran again in the backward pass
    _assert_same_gradients(got, expected)


@pytest.mark.parametrize("method", methods("pruned"))
def test_checkpointing_several_blocks_at_once_gives_the_gradients_of_the_run_without(method):
    model = _trained(strengthen(timm_model("timm-vit")))
    ts.patch(model, method)

    def features(m, every):
        tokens = m.norm_pre(m._pos_embed(m.patch_embed(images(2))))
        if every == 0:
            return m.blocks(tokens)
        return checkpoint_seq(m.blocks, tokens, every=every, use_reentrant=False)

    expected = _gradients(model, lambda m: features(m, 0))
    _assert_same_gradients(_gradients(model, lambda m: features(m, 2)), expected)


@pytest.mark.parametrize("host", ["ViTForImageClassification", "Dinov2Model", "CLIPVisionModel"])
@pytest.mark.parametrize("method", methods("pruned"))
def test_transformers_checkpointed_layers_give_the_gradients_of_the_run_without(host, method):
    model = _trained(strengthen(hf_model(host)))
    ts.patch(model, method)
    x = images(2)

    def run(m):
        out = m(pixel_values=x)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    _assert_checkpointed_layers_keep_the_gradients(model, run)


def _checkpointing_in_call(layer_class: type) -> type:
    """`layer_class` as earlier transformers 5.x releases made their layers: checkpointed in
    `__call__`, around the (patched) forward."""

    def __call__(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            call = functools.partial(nn.Module.__call__, self, **kwargs)
            return self._gradient_checkpointing_func(call, *args)
        return nn.Module.__call__(self, *args, **kwargs)

    return type(layer_class.__name__, (layer_class,), {"__call__": __call__})


def test_layers_that_checkpoint_in_their_call_are_not_checkpointed_again():
    model = _trained(strengthen(hf_model("ViTForImageClassification")))
    for layer in blocks_of(model):
        layer.__class__ = _checkpointing_in_call(type(layer))
    ts.patch(model, ts.DynamicViT(keep=0.5, layers=(1, 2)))
    x = images(2)
    _assert_checkpointed_layers_keep_the_gradients(model, lambda m: m(pixel_values=x).logits)


@pytest.mark.parametrize("method", [
    pytest.param(ts.TopK(keep=0.5, layers=(1,)), id="topk"),
    pytest.param(ts.DynamicViT(keep=0.5, layers=(1,), dynamic=True), id="dynamicvit"),
])
def test_checkpointed_clip_text_tower_gives_the_gradients_of_the_run_without(method):
    model = _trained(clip_text_model())
    ts.patch(model, method)
    ids, mask = texts([7, 12, 5])
    run = lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state  # noqa: E731
    _assert_checkpointed_layers_keep_the_gradients(model, run)


def test_checkpointed_sam_encoder_gives_the_gradients_of_the_run_without():
    model = _trained(sam_model())
    ts.patch(model, ts.DynamicViT(keep=0.5, layers=(1, 2)))
    run = lambda m: m(pixel_values=images(2)).last_hidden_state  # noqa: E731
    _assert_checkpointed_layers_keep_the_gradients(model, run)


def test_checkpointed_blip_text_encoder_with_image_tokens_gives_the_gradients_of_the_run_without():
    retrieval = _trained(blip_retrieval())
    encoder = retrieval.text_encoder
    ts.patch(encoder, ts.EViT(keep=0.5, layers=(1,)))
    ids, mask = texts([7, 12, 5])
    memory = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(1))

    def run(m):
        return m(input_ids=ids, attention_mask=mask, encoder_hidden_states=memory).last_hidden_state

    expected = _gradients(encoder, run)
    runs = []
    for layer in blocks_of(encoder):
        layer.attention.self.query.register_forward_hook(lambda module, args, out: runs.append(1))
    retrieval.activation_checkpointing_enable()  # BlipTextModel has no switch of its own
    got = _gradients(encoder, run)
    assert len(runs) == 2 * len(blocks_of(encoder))
    _assert_same_gradients(got, expected)


def test_timm_reentrant_checkpointing_is_refused_naming_the_fix():
    model = _trained(timm_model("timm-vit"))
    ts.patch(model, ts.ToMe(r=4))
    model.set_grad_checkpointing(True)
    with _timm_reentrant(True), pytest.raises(ValueError, match=r"set_reentrant_ckpt\(False\)") as refusal:
        model(images(2))
    assert "set_grad_checkpointing(False)" in str(refusal.value)


def test_transformers_reentrant_checkpointing_is_refused_naming_the_fix():
    model = _trained(hf_model("ViTModel"))
    ts.patch(model, ts.TopK(keep=0.5, layers=(1, 2)))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        model(pixel_values=images(2))


def _frozen(model):
    """`model` with every parameter frozen, as when only the method's parts train."""
    model.requires_grad_(False)
    return model


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_timm_reentrant_checkpointing_of_a_frozen_host_is_refused_naming_the_fix():
    model = _frozen(_trained(timm_model("timm-vit")))
    ts.patch(model, ts.DynamicViT(keep=0.5, layers=(1, 2)))  # its predictor trains, inside the blocks
    model.set_grad_checkpointing(True)
    with _timm_reentrant(True), pytest.raises(ValueError, match=r"set_reentrant_ckpt\(False\)"):
        model(images(2))


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_transformers_reentrant_checkpointing_of_a_frozen_host_is_refused_naming_the_fix():
    model = _frozen(_trained(hf_model("ViTModel")))
    ts.patch(model, ts.TopK(keep=0.5, layers=(1, 2)))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        model(pixel_values=images(2))


def test_a_frozen_host_trains_the_methods_parts_through_non_reentrant_checkpointing():
    model = _frozen(_trained(timm_model("timm-vit")))
    sieve = ts.patch(model, ts.DynamicViT(keep=0.5, layers=(1, 2)))
    model.set_grad_checkpointing(True)
    with _timm_reentrant(False), ts.trace(model) as traces:
        out = model(images(2))
    (out.square().mean() + traces[0].keep_decisions[0].decisions.mean()).backward()
    assert all(p.grad is not None for p in sieve.parameters())


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_a_checkpointed_model_under_no_grad_runs_as_without_checkpointing():
    model = _trained(timm_model("timm-vit"))
    ts.patch(model, ts.EViT(keep=0.5, layers=(1, 2)), dense=True)
    x = images(2)
    with torch.no_grad():
        expected = model(x)
        model.set_grad_checkpointing(True)
        for reentrant in (False, True):
            with _timm_reentrant(reentrant):
                torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


def test_a_block_run_again_on_tokens_it_never_saw_is_refused_in_the_backward_pass():
    model = _trained(timm_model("timm-vit"))
    ts.patch(model, ts.TopK(keep=0.5, layers=(1, 2)))

    def whole(pixels):  # checkpoints the embedding too: the blocks' input is made anew in the backward pass
        return model.forward_features(pixels)

    out = torch.utils.checkpoint.checkpoint(whole, images(2), use_reentrant=False)
    with pytest.raises(ValueError, match="checkpoint each block"):
        out.sum().backward()


def test_the_backward_pass_of_a_checkpointed_model_adds_no_trace():
    model = _trained(timm_model("timm-vit"))
    ts.patch(model, ts.TopK(keep=0.5, layers=(1, 2)))
    model.set_grad_checkpointing(True)
    with _timm_reentrant(False), ts.trace(model) as traces:
        model(images(2)).sum().backward()
    assert len(traces) == 1
    assert [record.layer for record in traces[0].layers] == [0, 1, 2, 3]
