"""With pruning off, a patched model gives the host's own output (promise 2 of the design)."""

import pytest
import torch
from models import forward, host_model, images, max_difference
from registry import HOSTS, host_methods

import tokensieve as ts

TOLERANCE = 1e-5


@pytest.mark.parametrize(("host", "method"), host_methods(HOSTS, "off"))
def test_patched_with_pruning_off_equals_host(host, method):
    model = host_model(host)
    x = images(2)
    expected = forward(model, x)
    ts.patch(model, method)
    assert max_difference(forward(model, x), expected) <= TOLERANCE


@pytest.mark.parametrize(("host", "method"), host_methods(["timm-vit", "ViTForImageClassification"], "off"))
def test_patched_with_pruning_off_in_train_mode_equals_host_in_train_mode(host, method):
    # The small hosts have no dropout or drop-path, so train mode is deterministic; a learnable
    # method's mask mode runs there, and with pruning off it must mask nothing.
    model = host_model(host).train()
    x = images(2)
    expected = forward(model, x)
    ts.patch(model, method)
    assert max_difference(forward(model, x), expected) <= TOLERANCE


@pytest.mark.parametrize("host", ["Dinov2ForImageClassification", "Dinov2WithRegistersModel"])
def test_patched_swiglu_dinov2_with_pruning_off_equals_host(host):
    model = host_model(host, use_swiglu_ffn=True)
    x = images(2)
    expected = forward(model, x)
    ts.patch(model, ts.EViT(keep=1.0, layers=(1, 2)))
    assert max_difference(forward(model, x), expected) <= TOLERANCE


@pytest.mark.parametrize(
    "host", ["timm-deit3", "DeiTForImageClassificationWithTeacher", "Dinov2WithRegistersModel"]
)
def test_patched_with_eager_attention_and_pruning_off_equals_host(host):
    model = host_model(host)
    x = images(2)
    expected = forward(model, x)
    ts.patch(model, ts.TopK(keep=1.0, layers=(1,)), attention="eager")
    assert max_difference(forward(model, x), expected) <= TOLERANCE


def test_patched_with_pruning_off_equals_host_under_hf_eager_attention():
    model = host_model("Dinov2WithRegistersForImageClassification", attn_implementation="eager")
    x = images(2)
    expected = forward(model, x)
    ts.patch(model, ts.ToMe(r=0))
    assert max_difference(forward(model, x), expected) <= TOLERANCE


@pytest.mark.fullsize
def test_patched_full_size_vit_with_pruning_off_equals_host():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    model = ViTModel(ViTConfig()).eval()  # ViT-B/16 at 224x224
    x = torch.randn(1, 3, 224, 224)
    expected = forward(model, x)
    ts.patch(model, ts.EViT(keep=1.0, layers=(3, 6, 9)))
    assert max_difference(forward(model, x), expected) <= TOLERANCE
