"""Bad settings and unsupported models fail early with errors that say what to do; no setting
prunes every token away."""

import re

import pytest
import timm
import torch
import transformers
from models import DEPTH, PATCHES, forward, host_model, images, predictors
from registry import REGISTRY, Host, methods

import tokensieve as ts

ALL_LAYERS = tuple(range(DEPTH))


UNSUPPORTED = {
    "nn.Linear": lambda: torch.nn.Linear(4, 4),
    "timm-resnet": lambda: timm.create_model("resnet10t", pretrained=False, num_classes=10),
    "hf-ViTForMaskedImageModeling": lambda: transformers.ViTForMaskedImageModeling(transformers.ViTConfig(
        image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32)),
}


@pytest.mark.parametrize("build", UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_unsupported_model_is_a_type_error_naming_the_supported_families(build):
    model = build()
    with pytest.raises(TypeError) as error:
        ts.patch(model, ts.ToMe(r=2))
    message = str(error.value)
    for family in ("timm", "VisionTransformer", "transformers", "ViT", "DeiT", "Dinov2"):
        assert family in message
    assert not ts.is_patched(model)


def test_non_method_is_a_type_error():
    with pytest.raises(TypeError, match="EViT"):
        ts.patch(host_model("timm-vit"), "evit")


def test_unknown_attention_is_a_value_error():
    with pytest.raises(ValueError, match="sdpa"):
        ts.patch(host_model("timm-vit"), ts.ToMe(r=2), attention="flash")


@pytest.mark.parametrize("keep", [0, -0.1, 1.5])
@pytest.mark.parametrize("method", [ts.TopK, ts.EViT, ts.DynamicViT])
def test_keep_outside_zero_one_is_a_value_error(method, keep):
    model = host_model("timm-vit")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ts.patch(model, method(keep=keep, layers=(1,)))
    assert not ts.is_patched(model)


@pytest.mark.parametrize("mass", [0, -0.5, 1.5])
def test_topk_mass_outside_zero_one_is_a_value_error(mass):
    with pytest.raises(ValueError, match="mass"):
        ts.patch(host_model("timm-vit"), ts.TopK(mass=mass, layers=(1,)))


@pytest.mark.parametrize("method", [
    ts.TopK(layers=(1, 7)), ts.EViT(layers=(7,)), ts.DynamicViT(layers=(7,)), ts.ToMe(r=2, layers=(7,)),
], ids=["topk", "evit", "dynamicvit", "tome"])
@pytest.mark.parametrize("host", ["timm-vit", "Dinov2Model"])
def test_layer_index_past_the_depth_is_a_value_error_naming_the_depth(host, method):
    with pytest.raises(ValueError, match=rf"\b{DEPTH}\b"):
        ts.patch(host_model(host), method)


def test_default_layers_on_a_shallow_model_are_a_value_error():
    with pytest.raises(ValueError, match=rf"\b{DEPTH}\b"):
        ts.patch(host_model("timm-vit"), ts.EViT())  # layers (3, 6, 9) on a 4-block model


def test_failed_patch_keeps_the_previous_patch():
    model = host_model("timm-vit")
    ts.patch(model, ts.ToMe(r=2))
    with pytest.raises(ValueError):
        ts.patch(model, ts.EViT(keep=0))
    assert ts.sieve_of(model).method == ts.ToMe(r=2)
    with ts.trace(model) as traces:
        forward(model, images(1))
    assert traces[0].kept_tokens()[-1].item() == 1 + PATCHES - 2 * DEPTH


@pytest.mark.parametrize("host", ["timm-vit", "Dinov2ForImageClassification"])
def test_tome_r_too_large_is_a_value_error_suggesting_an_r_that_works(host):
    too_large = PATCHES // 2 + 1
    model = host_model(host)
    with pytest.raises(ValueError) as error:
        ts.patch(model, ts.ToMe(r=too_large))
    message = str(error.value)
    suggested = [int(n) for n in re.findall(r"\d+", message) if 0 < int(n) < too_large]
    assert suggested, message
    ts.patch(model, ts.ToMe(r=max(suggested)))
    with ts.trace(model) as traces:
        forward(model, images(2))
    assert (traces[0].kept_tokens() > 1).all()


def test_tome_negative_r_is_a_value_error():
    with pytest.raises(ValueError, match="r"):
        ts.patch(host_model("timm-vit"), ts.ToMe(r=-1))


def test_tome_schedule_longer_than_the_model_is_a_value_error():
    with pytest.raises(ValueError, match=rf"\b{DEPTH}\b"):
        ts.patch(host_model("timm-vit"), ts.ToMe(r=[1] * (DEPTH + 1)))


@pytest.mark.parametrize("method", [pytest.param(entry.pruned, id=entry.name)
                                    for entry in REGISTRY if entry.class_attention])
def test_class_attention_methods_on_a_model_without_class_token_are_a_value_error(method):
    model = host_model("timm-vit", class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        ts.patch(model, method)


@pytest.mark.parametrize("method", methods(host=Host(class_token=False, mean_pooled=True)))
def test_methods_that_need_no_class_token_run_on_a_model_without_one(method):
    model = host_model("timm-vit", class_token=False, reg_tokens=2, global_pool="avg")
    x = images(2)
    ts.patch(model, method)
    with ts.trace(model) as traces:
        out = forward(model, x)["out"]
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert traces[0].prefix == 2
    assert traces[0].kept_tokens()[-1].tolist() < [2 + PATCHES] * 2


NEAR_ZERO = {
    "topk": ts.TopK(keep=1e-6, layers=ALL_LAYERS),
    "topk-mass": ts.TopK(mass=1e-6, layers=ALL_LAYERS),
    "evit": ts.EViT(keep=1e-6, layers=ALL_LAYERS),
    "evit-no-fuse": ts.EViT(keep=1e-6, layers=ALL_LAYERS, fuse=False),
    "dynamicvit": ts.DynamicViT(keep=1e-3, layers=ALL_LAYERS),
}


NEAR_ZERO_HOSTS = {
    "timm-reg-gap": lambda: host_model("timm-reg-gap"),  # mean-pooled: ragged methods are refused
    "timm-registers-cls": lambda: host_model("timm-vit", reg_tokens=4),
    "DeiTForImageClassificationWithTeacher": lambda: host_model("DeiTForImageClassificationWithTeacher"),
}
NEAR_ZERO_CASES = [
    pytest.param(host, method, id=f"{host}-{name}")
    for host in NEAR_ZERO_HOSTS for name, method in NEAR_ZERO.items()
    if not (host == "timm-reg-gap" and method.ragged)
]


@pytest.mark.parametrize(("host", "method"), NEAR_ZERO_CASES)
def test_no_setting_prunes_every_non_prefix_token(host, method):
    model = NEAR_ZERO_HOSTS[host]()
    ts.patch(model, method)
    with ts.trace(model) as traces:
        out = forward(model, images(2))
    trace = traces[0]
    assert (trace.kept_tokens() - trace.prefix >= 1).all()
    assert (trace.attention_tokens() - trace.prefix >= 1).all()
    assert all(torch.isfinite(value).all() for value in out.values())


def test_dynamic_dynamicvit_keeps_a_token_when_its_predictor_rejects_all():
    model = host_model("timm-vit")
    x = images(2)
    sieve = ts.patch(model, ts.DynamicViT(keep=0.5, layers=(1, 2), dynamic=True))

    def reject_all(module, inputs, logits):  # [B, N, 2] (drop, keep)
        return torch.stack([logits[..., 0], logits[..., 0] - 1e4], dim=-1)

    for predictor in predictors(sieve):
        predictor.register_forward_hook(reject_all)
    with ts.trace(model) as traces:
        out = forward(model, x)["out"]
    assert (traces[0].kept_tokens() - 1 >= 1).all()
    assert traces[0].kept_tokens()[-1].tolist() == [2, 2]
    assert torch.isfinite(out).all()


def test_a_patched_model_refuses_an_attention_mask_rather_than_ignoring_it():
    timm_model = host_model("timm-vit")
    ts.patch(timm_model, ts.EViT(keep=0.5, layers=(1,)))
    mask = torch.ones(1 + PATCHES, 1 + PATCHES, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="mask"):
        timm_model(images(2), attn_mask=mask)
    hf_model = host_model("ViTModel")
    ts.patch(hf_model, ts.EViT(keep=0.5, layers=(1,)))
    padding = torch.ones(2, 1 + PATCHES)
    padding[:, -3:] = 0
    with pytest.raises(ValueError, match="mask"):
        hf_model(images(2), attention_mask=padding)


def test_asking_a_patched_transformers_model_for_attention_maps_is_a_value_error():
    model = host_model("ViTModel")
    ts.patch(model, ts.EViT(keep=0.5, layers=(1,)))
    with pytest.raises(ValueError, match="attention maps"):
        model(pixel_values=images(1), output_attentions=True)
    hidden = model(pixel_values=images(1), output_hidden_states=True).hidden_states
    assert hidden[-1].shape[1] < hidden[0].shape[1]  # hidden states come back, pruned
