"""ts.benchmark on a model the caller patched (its own parts and thresholds) and on given pixels."""

from __future__ import annotations

import pytest
import torch
from models import host_model, images, strengthen

import tokensieve as ts
from tokensieve.patch import runner_of

QUICK = dict(repeats=1, warmup=0, threads=1)


def _calibrated_svit(dense: bool) -> torch.nn.Module:
    model = strengthen(host_model("timm-vit"))
    ts.patch(model, ts.SViT(keep=0.5), dense=dense)
    ts.calibrate(model, images(4, seed=1))
    return model


@pytest.mark.parametrize("dense", [False, True])
def test_a_patched_model_is_timed_with_its_own_gates_and_thresholds(dense):
    model = _calibrated_svit(dense)
    thresholds = [float(gate.threshold) for gate in runner_of(model).parts.values()]
    pixels = images(3, seed=2)
    result = ts.benchmark(model, pixels=pixels, **QUICK)
    # Fresh gates at the initial threshold would prune otherwise: the MACs are those of this model.
    assert result.gmacs == pytest.approx(ts.flops(model, pixels).macs / 1e9)
    assert result.flops_ratio > 1.2
    assert result.method == str(ts.SViT(keep=0.5))
    assert [float(gate.threshold) for gate in runner_of(model).parts.values()] == thresholds
    assert runner_of(model).dense is dense  # the caller's model is left patched as it was


def test_given_pixels_set_the_batch_and_size_and_are_the_ones_timed():
    model = _calibrated_svit(dense=True)
    pixels = images(3, seed=2)
    result = ts.benchmark(model, pixels=pixels, **QUICK)
    assert (result.batch, result.image_size) == (3, pixels.shape[-1])
    other = images(3, seed=3) * 0.05  # another content: the gates keep other counts
    assert ts.flops(model, other).macs != ts.flops(model, pixels).macs
    assert result.gmacs == pytest.approx(ts.flops(model, pixels).macs / 1e9)


def test_a_method_with_a_patched_model_still_patches_a_fresh_copy():
    model = _calibrated_svit(dense=False)
    pixels = images(2, seed=2)
    fresh = host_model("timm-vit")
    ts.patch(fresh, ts.TopK(keep=0.5, layers=(1, 2)))
    result = ts.benchmark(model, ts.TopK(keep=0.5, layers=(1, 2)), pixels=pixels, **QUICK)
    assert result.gmacs == pytest.approx(ts.flops(fresh, pixels).macs / 1e9)


def test_without_a_method_the_model_must_be_patched():
    with pytest.raises(ValueError, match="patch the model"):
        ts.benchmark(host_model("timm-vit"), **QUICK)


def test_pixels_that_disagree_with_batch_or_image_size_are_refused():
    model = _calibrated_svit(dense=False)
    with pytest.raises(ValueError, match="leave batch and image_size out"):
        ts.benchmark(model, batch=2, pixels=images(3), **QUICK)
    with pytest.raises(ValueError, match="leave batch and image_size out"):
        ts.benchmark(model, image_size=32, pixels=images(3), **QUICK)


def test_a_guided_method_is_timed_with_the_per_call_inputs_given():
    from models import sam_model

    model = sam_model()
    method = ts.VLTP(keep=0.25, layers=(1,), guidance_width=12, width=16, heads=2)
    guidance = torch.randn(2, 12)
    result = ts.benchmark(model, method, batch=2, repeats=1, warmup=0, inputs={"guidance": guidance})
    assert result.flops_ratio > 1.2 and result.pruned_ms > 0
    with pytest.raises(ValueError, match=r"needs the per-call input 'guidance'"):
        ts.benchmark(model, method, batch=2, repeats=1, warmup=0)


def test_a_result_names_the_cpu_and_its_widest_vector_instructions(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu sse2 avx2 avx512f\n\n"
                       "processor\t: 1\nmodel name\t: Some CPU 9000\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert ts.bench.machine(str(cpuinfo)) == "Some CPU 9000 (AVX-512, AVX2)"
    (tmp_path / "older").write_text("model name\t: Older CPU\nflags\t\t: fpu sse2\n")
    assert ts.bench.machine(str(tmp_path / "older")) == "Older CPU"
