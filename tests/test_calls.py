"""Skipped no-op sub-modules and in-place steps never change what the host's forward would do."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from models import (
    blip_retrieval,
    blocks_of,
    clip_text_model,
    forward,
    host_model,
    images,
    max_difference,
    sam_model,
    texts,
)
from registry import HOSTS
from torch import nn
from transformers.activations import ACT2FN, GELUActivation

import tokensieve as ts
from tokensieve import calls


def test_only_hookless_identities_and_idle_dropouts_are_skipped():
    identity, dropout, active = nn.Identity(), nn.Dropout(0.1).eval(), nn.Dropout(0.1).train()
    assert calls.skippable(identity) and calls.skippable(dropout) and calls.skippable(nn.Dropout(0.0).train())
    assert not calls.skippable(active) and not calls.skippable(nn.LayerNorm(4))
    handle = identity.register_forward_hook(lambda module, args, out: None)
    assert not calls.skippable(identity)
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    try:
        assert not calls.skippable(nn.Identity())  # a global hook sees every call
    finally:
        handle.remove()


def test_gelu_runs_in_place_only_without_grad():
    gelu, x = nn.GELU(), torch.randn(3, 5)
    expected = gelu(x)
    with torch.no_grad():
        fresh = x.clone()
        out = calls.activate(gelu, fresh)
        assert out.data_ptr() == fresh.data_ptr() and torch.equal(out, expected)
    recorded = x.clone().requires_grad_() * 1.0  # a gradient is recorded: the input stays as it was
    out = calls.activate(gelu, recorded)
    assert out.data_ptr() != recorded.data_ptr() and torch.equal(recorded.detach(), x)
    assert torch.equal(out.detach(), expected)


def _hook_calls_host_then_patched(model: nn.Module, seen: list) -> tuple[list, list]:
    """What the hooks appending to `seen` recorded in a host forward and then in a patched one
    (pruning nothing), after checking that the two outputs agree."""
    pixels = images(2)
    with torch.no_grad():
        expected = forward(model, pixels)
        host_calls = list(seen)
        seen.clear()
        ts.patch(model, ts.TopK(keep=1.0, layers=(1,)))
        got = forward(model, pixels)
    assert max_difference(got, expected) <= 1e-5
    return host_calls, list(seen)


def test_hooks_on_skippable_sub_modules_of_a_patched_timm_model_still_fire():
    model = host_model("timm-deit3")  # LayerScale, identity q/k norms, eval-mode dropouts
    seen = []
    for block in model.blocks:
        block.attn.q_norm.register_forward_hook(lambda module, args, out: seen.append("q_norm"))
        block.drop_path2.register_forward_pre_hook(lambda module, args: seen.append("drop_path2"))
    host_calls, patched_calls = _hook_calls_host_then_patched(model, seen)
    assert patched_calls == host_calls and len(host_calls) == 2 * len(model.blocks)


def test_train_mode_dropout_and_drop_path_still_run_in_the_patched_model():
    model = host_model("timm-vit", proj_drop_rate=0.5, drop_path_rate=0.5).train()
    ts.patch(model, ts.TopK(keep=1.0, layers=(1,)))
    pixels = images(2)
    with torch.no_grad():
        first, second = forward(model, pixels), forward(model, pixels)
        model.eval()
        evaluated = forward(model, pixels)
    assert max_difference(first, second) > 1e-3 and max_difference(first, evaluated) > 1e-3


def test_transformers_gelu_runs_in_place_only_when_it_is_torchs_gelu():
    assert calls._gelu_mode(GELUActivation()) == "none"
    assert calls._gelu_mode(GELUActivation(use_gelu_python=True)) is None  # its own formula
    assert calls._gelu_mode(ACT2FN["gelu_new"]) is None  # the tanh form, computed differently
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(calls.activate(GELUActivation(), x.clone()), GELUActivation()(x))


def test_a_hooked_transformers_mlp_runs_whole_in_a_patched_model():
    model = host_model("ViTForImageClassification")
    seen = []
    for layer in blocks_of(model):
        layer.mlp.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    host_calls, patched_calls = _hook_calls_host_then_patched(model, seen)
    assert patched_calls == host_calls and len(host_calls) == len(blocks_of(model))


def test_packed_linear_equals_the_plain_product_and_follows_every_versioned_weight_change():
    torch.manual_seed(0)
    linear, x = nn.Linear(16, 24), torch.randn(2, 5, 16)

    def check() -> None:
        expected = F.linear(x, linear.weight, linear.bias)
        torch.testing.assert_close(calls.linear(linear, x), expected, atol=1e-5, rtol=0)

    with ts.prepacked(linear):
        with torch.inference_mode():
            check()
            assert linear in calls._PACKED  # the packed path ran, not the fallback
        with torch.no_grad():
            linear.weight.mul_(-2.0)  # in place: same storage, new version
            check()
            linear.load_state_dict({"weight": torch.randn(24, 16), "bias": torch.randn(24)})
            check()
        reused = 0
        for _ in range(20):  # a new weight, often at the freed one's address with the same version
            address = linear.weight.data_ptr()
            del linear.weight
            linear.weight = nn.Parameter(torch.randn(24, 16))
            reused += linear.weight.data_ptr() == address
            with torch.no_grad():
                check()
    assert reused  # the allocator did hand an address back, so the identity check was exercised


def test_linear_takes_the_plain_path_for_gradients_hooks_and_other_dtypes():
    linear, x = nn.Linear(8, 4), torch.randn(3, 8)
    half = nn.Linear(8, 4).to(torch.bfloat16)
    with ts.prepacked(linear, half):
        out = calls.linear(linear, x)  # a gradient is recorded: the host's own call
        assert out.requires_grad and linear not in calls._PACKED
        out.sum().backward()
        assert linear.weight.grad is not None
        seen = []
        linear.register_forward_hook(lambda module, args, out: seen.append("linear"))
        with torch.no_grad():
            calls.linear(linear, x)
        assert seen == ["linear"] and linear not in calls._PACKED
        with torch.no_grad():
            out = calls.linear(half, x.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16 and half not in calls._PACKED


def test_a_model_copied_in_inference_mode_runs_its_linears_plainly():
    host = host_model("timm-vit").eval()
    pixels = images(2)
    with torch.inference_mode():
        made_here = copy.deepcopy(host)  # inference tensors: no version counter to check
        ts.patch(made_here, ts.TopK(keep=1.0, layers=(1,)))
        with ts.prepacked(made_here):
            patched = made_here(pixels)
            expected = host(pixels)
            assert not host.blocks[0].attn.qkv.weight.is_inference()  # the host's own stay normal
            made_here.blocks[0].attn.qkv.weight.mul_(2.0)  # an in-place change a cache would miss
            changed = made_here(pixels)
            assert made_here.blocks[0].attn.qkv not in calls._PACKED
    assert (patched - expected).abs().max().item() <= 1e-5
    assert (changed - expected).abs().max().item() > 1e-3


def _halve_weights(model: nn.Module) -> None:
    for parameter in model.parameters():
        parameter.data.mul_(0.5)  # through `.data`: the parameter's version counter does not move


def test_weights_changed_through_data_are_never_served_stale():
    host = host_model("timm-vit").eval()
    pixels = images(2)
    patched = copy.deepcopy(host)
    ts.patch(patched, ts.TopK(keep=1.0, layers=(1,)))
    teacher = copy.deepcopy(host)
    with torch.no_grad():
        patched(pixels)  # a first call, as a cache would see it
        _halve_weights(host)
        _halve_weights(patched)
        assert (patched(pixels) - host(pixels)).abs().max().item() <= 1e-5
        for mine, theirs in zip(patched.parameters(), teacher.parameters(), strict=True):
            mine.data.copy_(theirs.data)  # the mean-teacher / EMA copy
        assert (patched(pixels) - teacher(pixels)).abs().max().item() <= 1e-5


def test_a_copy_packed_after_its_block_closed_is_not_served_by_the_next_block():
    linear, x = nn.Linear(16, 24), torch.randn(2, 5, 16)
    with torch.no_grad():
        with ts.prepacked(linear):
            calls.linear(linear, x)
        # another thread's call, still running when the block closed, packs the weight again
        calls._PACKED[linear] = (weakref.ref(linear.weight),
                                 (linear.weight.data_ptr(), linear.weight._version),
                                 torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 10))
        linear.weight.data.mul_(0.5)  # outside any block, as the contract allows
        with ts.prepacked(linear):
            torch.testing.assert_close(calls.linear(linear, x), F.linear(x, linear.weight, linear.bias),
                                       atol=1e-5, rtol=0)


def test_prepacked_weights_serve_only_inside_the_block_that_promises_them():
    host = host_model("timm-vit").eval()
    pixels = images(2)
    patched = copy.deepcopy(host)
    ts.patch(patched, ts.TopK(keep=1.0, layers=(1,)))
    qkv = patched.blocks[0].attn.qkv
    with torch.no_grad():
        with ts.prepacked(patched):
            inside = patched(pixels)
            assert qkv in calls._PACKED  # the packed path ran
            with ts.prepacked(patched):  # nested: the outer block still holds the copies after this
                patched(pixels)
            assert qkv in calls._PACKED
        assert qkv not in calls._PACKED  # leaving the block drops the copies
        assert (inside - host(pixels)).abs().max().item() <= 1e-5
        _halve_weights(host)
        _halve_weights(patched)
        assert (patched(pixels) - host(pixels)).abs().max().item() <= 1e-5


def _linears_of_blocks(blocks: list[nn.Module]) -> list[nn.Linear]:
    return [m for block in blocks for m in block.modules() if type(m) is nn.Linear]


@pytest.mark.parametrize("name", list(HOSTS))
def test_prepacked_linears_keep_every_host_equal_to_its_own_forward(name):
    host = host_model(name).eval()
    pixels = images(2)
    patched = copy.deepcopy(host)
    ts.patch(patched, ts.TopK(keep=1.0, layers=(1,)))
    with torch.no_grad(), ts.prepacked(patched):
        difference = max_difference(forward(patched, pixels), forward(host, pixels))
        unpacked = [m for m in _linears_of_blocks(blocks_of(patched)) if m not in calls._PACKED]
    assert not unpacked  # every linear layer of every block ran on its packed weight
    assert difference <= 1e-4


def test_prepacked_linears_serve_sam_and_both_text_towers():
    pixels = images(2)
    ids, mask = texts([5, 7])
    sam, blip, clip = sam_model(), blip_retrieval(), clip_text_model()
    cases = [(sam, lambda m: m, lambda m: m(pixels).last_hidden_state),
             (blip, lambda m: m.text_encoder,
              lambda m: m(input_ids=ids, attention_mask=mask, pixel_values=pixels[:, :, :32, :32]).itm_score),
             (clip, lambda m: m, lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state)]
    for host, tower_of, run in cases:
        patched = copy.deepcopy(host)
        ts.patch(tower_of(patched), ts.RandomDrop(keep=1.0, layers=(1,)))
        with torch.no_grad(), ts.prepacked(patched):
            difference = (run(patched) - run(host)).abs().max().item()
            unpacked = [m for m in _linears_of_blocks(blocks_of(tower_of(patched))) if m not in calls._PACKED]
        assert not unpacked, type(host).__name__  # every linear layer of every block ran packed
        assert difference <= 1e-4, type(host).__name__
