"""FLOP counts: the published DeiT-S figures, and agreement with torch's own counter."""

from __future__ import annotations

import dataclasses
import json

import pytest
import timm
import torch
from click.testing import CliRunner
from flop_counting import counted_macs
from registry import REGISTRY
from transformers import (
    BlipVisionConfig,
    BlipVisionModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    ViTConfig,
    ViTForImageClassification,
)

import tokensieve as ts
from tokensieve import bench
from tokensieve.cli import main

# Published DeiT-S backbone GMACs at 224x224 (DeiT, EViT, DynamicViT and ToMe papers).
PUBLISHED_DEIT_S = [
    (None, 4.6),
    (ts.EViT(keep=0.7), 3.0),
    (ts.EViT(keep=0.5), 2.3),
    (ts.DynamicViT(keep=0.7), 2.9),
    (ts.ToMe(r=8), 3.4),
    (ts.ToMe(r=13), 2.7),
    (ts.ToMe(r=16), 2.3),
]
# (method, whether it spends MACs outside the host's layers): every registered method, and a ToMe schedule
METHODS = [pytest.param(entry.pruned, entry.overhead, id=entry.name) for entry in REGISTRY
           if not entry.map_only] + [
    pytest.param(ts.ToMe(r=(3, -0.5)), True, id="tome-inflect"),
]


@pytest.fixture(scope="module")
def deit_small():
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


@pytest.mark.parametrize(("method", "gmacs"), PUBLISHED_DEIT_S, ids=str)
def test_deit_small_backbone_macs_match_published(deit_small, method, gmacs):
    ts.unpatch(deit_small)
    if method is not None:
        ts.patch(deit_small, method)
    report = ts.flops(deit_small, torch.randn(1, 3, 224, 224))
    assert report.backbone_macs / 1e9 == pytest.approx(gmacs, rel=0.02)
    assert report.macs == pytest.approx(report.backbone_macs + report.overhead_macs)


def _small_timm():
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=96, depth=6,
                             num_classes=10).eval()


def _small_hf():
    config = ViTConfig(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=6,
                       num_attention_heads=4, intermediate_size=128, num_labels=5)
    return ViTForImageClassification(config).eval()


def _small_clip():
    config = CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=6,
                              num_attention_heads=4, intermediate_size=128, projection_dim=32)
    return CLIPVisionModelWithProjection(config).eval()


def _small_blip():
    config = BlipVisionConfig(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=6,
                              num_attention_heads=4, intermediate_size=128)
    return BlipVisionModel(config).eval()


SMALL_MODELS = {"timm": _small_timm, "transformers": _small_hf, "clip": _small_clip, "blip": _small_blip}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize(("method", "overhead"), METHODS)
@pytest.mark.parametrize("family", SMALL_MODELS)
def test_report_agrees_with_flop_counter_mode(family, method, overhead, attention):
    torch.manual_seed(0)
    model = SMALL_MODELS[family]()
    size = 96 if family == "timm" else 64
    pixels = torch.randn(2, 3, size, size)
    inputs = pixels if family == "timm" else {"pixel_values": pixels}
    if getattr(method, "layers", None) is not None:  # the 6-block models prune at three layers
        method = dataclasses.replace(method, layers=(1, 3, 4))
    ts.patch(model, method, attention=attention)
    report = ts.flops(model, inputs)
    assert report.macs < report.dense_macs  # pruning happened
    assert (report.overhead_macs > 0) == overhead
    if method.ragged:  # each sample its own count: the counter sees a padded batch, so count each alone
        counted = sum(counted_macs(model, inputs[i : i + 1] if family == "timm"
                                   else {"pixel_values": pixels[i : i + 1]}, batch=1) for i in range(2)) / 2
    else:
        counted = counted_macs(model, inputs, batch=2)
    assert report.macs == pytest.approx(counted, rel=0.01)


def test_dense_report_of_unpatched_model_agrees_with_flop_counter_mode():
    model = _small_timm()
    pixels = torch.randn(1, 3, 96, 96)
    report = ts.flops(model, pixels)
    assert not ts.is_patched(model)
    assert report.macs == report.dense_macs == pytest.approx(counted_macs(model, pixels, 1), rel=1e-9)


def test_ragged_report_counts_each_sample_by_its_own_tokens():
    torch.manual_seed(0)
    model = _small_timm()
    with torch.no_grad():  # peaky attention, so the kept counts differ from image to image
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.embed_dim] *= 6
    ts.patch(model, ts.TopK(mass=0.3, layers=(1, 3)))
    pixels = torch.randn(4, 3, 96, 96)
    pixels[1] *= 4
    pixels[2] = 0
    pixels[2, :, :32, :32] = 3
    report = ts.flops(model, pixels)
    for i in range(4):
        alone = ts.flops(model, pixels[i : i + 1])
        assert report.per_sample[i] == pytest.approx(alone.macs, rel=1e-9)
    assert len(set(report.per_sample)) > 1


def test_cli_flops_json_lists_every_method():
    arguments = ["flops", "deit_tiny_patch16_224", "evit:keep=0.5", "tome:r=8", "--json"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [r["method"] for r in rows] == ["EViT(keep=0.5)", "ToMe(r=8)"]
    assert all(r["unit"] == "MACs" and r["macs"] < r["dense_macs"] for r in rows)


def test_cli_rejects_unknown_model_and_bad_method_settings():
    runner = CliRunner()
    unknown = runner.invoke(main, ["flops", "no_such_model_anywhere"])
    assert unknown.exit_code != 0 and "neither a transformers model directory nor a timm" in unknown.output
    bad = runner.invoke(main, ["flops", "deit_tiny_patch16_224", "evit:keep=1.5"])
    assert bad.exit_code == 2 and "(0, 1]" in bad.output


def test_cli_bench_json_reports_ratios(tmp_path):
    result = CliRunner().invoke(main, ["bench", "deit_tiny_patch16_224", "topk:keep=0.5", "--repeats", "2",
                                       "--warmup", "0", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["results"][0]
    assert row["threads"] == 1 and row["batch"] == 1 and row["dtype"] == "float32"
    assert row["flops_ratio"] > 1.5
    assert 0.0 <= row["overhead_share"] < 1.0
    assert row["speedup"] == pytest.approx(row["host_ms"] / row["pruned_ms"])
    assert row["pruning_speedup"] == pytest.approx(row["unpruned_ms"] / row["pruned_ms"])
    assert row["efficiency"] == pytest.approx(row["pruning_speedup"] / row["flops_ratio"])
    for name in ("speedup_range", "pruning_speedup_range"):
        low, high = row[name]  # quartiles of the two rounds' own ratios
        assert 0.0 < low <= high
    assert row["prepacked"] is False


def test_cli_bench_table_shows_the_speedup_over_the_host_and_pruning_own(tmp_path):
    result = CliRunner().invoke(main, ["bench", "deit_tiny_patch16_224", "topk:keep=0.5", "--repeats", "1",
                                       "--warmup", "0", "--threads", "1", "--prepack"])
    assert result.exit_code == 0, result.output
    for heading in ("host ms", "unpruned ms", "pruned ms", "speedup", "pruning speedup", "prepacked"):
        assert heading in result.output


def test_speedup_range_is_the_quartiles_of_the_rounds():
    assert bench._quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0)
    assert bench._quartiles([1.3]) == (1.3, 1.3)


def test_cli_loads_a_saved_transformers_directory(tmp_path):
    model = _small_hf()
    model.save_pretrained(tmp_path)
    result = CliRunner().invoke(main, ["flops", str(tmp_path), "topk:keep=0.5,layers=(1,2)", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["results"][0]
    assert row["macs"] < row["dense_macs"]
