"""A batch of no images: a patched model returns what its host returns (there is nothing to prune),
and FLOPs, a count per sample, are refused."""

import pytest
import torch
from models import forward, host_model, images
from registry import host_methods

import tokensieve as ts

# Hosts whose own forward takes an empty batch (transformers' ViT, DeiT, Dinov2 and CLIP do not).
HOSTS = ["timm-vit", "timm-reg-gap", "BlipVisionModel"]


@pytest.mark.parametrize("dense", [False, True], ids=["gather", "dense"])
@pytest.mark.parametrize(("host", "method"), host_methods(HOSTS, "pruned", "ragged"))
def test_patched_model_on_an_empty_batch_returns_what_the_host_returns(host, method, dense):
    model = host_model(host)
    x = images(0)
    expected = forward(model, x)
    ts.patch(model, method, dense=dense)
    out = forward(model, x)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in expected.items()}


@pytest.mark.parametrize("host", ["timm-vit", "BlipVisionModel"])
def test_learnable_method_in_train_mode_on_an_empty_batch_returns_what_the_host_returns(host):
    model = host_model(host).train()
    x = images(0)
    expected = forward(model, x)
    ts.patch(model, ts.DynamicViT(keep=0.5, layers=(1, 2)))
    out = forward(model, x)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in expected.items()}


@pytest.mark.parametrize("method", [None, ts.TopK(keep=0.5, layers=(1,)), ts.ToMe(r=4)],
                         ids=["unpatched", "topk", "tome"])
def test_flops_of_an_empty_batch_is_refused_asking_for_a_sample(method):
    model = host_model("timm-vit")
    if method is not None:
        ts.patch(model, method)
    with pytest.raises(ValueError, match="at least one"):
        ts.flops(model, images(0))
    assert torch.isfinite(torch.tensor(ts.flops(model, images(1)).macs))  # the model still counts
