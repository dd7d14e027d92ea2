"""Models tokensieve patches only through what they hold: a torch.compile or DataParallel wrapper,
a whole CLIP or BLIP model. The refusal names the module to patch instead, and that works."""

import re

import pytest
import torch
from models import PATCHES, blip_retrieval, clip_text_model, hf_model, images, timm_model

import tokensieve as ts

METHOD = ts.TopK(keep=0.5, layers=(1,))


def _refusal(model) -> str:
    with pytest.raises(TypeError) as error:
        ts.patch(model, METHOD)
    assert not ts.is_patched(model)
    return str(error.value)


def test_a_compiled_model_is_refused_naming_the_model_it_compiles():
    model = timm_model("timm-vit")
    message = _refusal(torch.compile(model))
    assert "ts.patch(model._orig_mod, method)" in message


def test_a_compiled_model_whose_model_is_patched_runs_the_patched_blocks():
    model = timm_model("timm-vit")
    compiled = torch.compile(model, backend="eager")  # compiles no kernels: quick, same arithmetic
    _refusal(compiled)
    ts.patch(compiled._orig_mod, METHOD)  # what the message asks for, then the wrapper is called as before
    x = images(2)
    with torch.no_grad(), ts.trace(model) as traces:
        got = compiled(x)
        expected = model(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert len(traces) == 2  # both calls ran the patched blocks, which pruned
    assert all(int(t.kept_tokens()[-1, 0]) < PATCHES + 1 for t in traces)


def test_a_data_parallel_wrapper_is_refused_naming_the_model_it_holds():
    model = timm_model("timm-vit")
    message = _refusal(torch.nn.DataParallel(model))
    assert "ts.patch(model.module, method)" in message
    ts.patch(model, METHOD)  # what the message asks for
    with torch.no_grad():
        assert model(images(2)).shape == (2, 10)


@pytest.mark.parametrize(("build", "towers"), [
    (lambda: clip_text_model("CLIPModel"), ("text_model", "vision_model")),
    (blip_retrieval, ("vision_model", "text_encoder")),
], ids=["CLIPModel", "BlipForImageTextRetrieval"])
def test_a_model_of_two_towers_is_refused_naming_both_towers_patched_together(build, towers):
    model = build()
    message = _refusal(model)
    together = f"ts.patch([model.{towers[0]}, model.{towers[1]}], method)"
    assert together in message
    sieve = ts.patch([getattr(model, name) for name in towers], METHOD)  # what the message asks for
    assert len(sieve.runners) == 2


def test_a_task_model_around_a_supported_model_names_it_and_the_supported_families():
    import transformers

    config = transformers.ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32)
    message = _refusal(transformers.ViTForMaskedImageModeling(config))
    assert "ts.patch(model.vit, method)" in message
    assert re.search(r"Supported: timm VisionTransformer", message)


def test_a_model_holding_no_supported_model_names_only_the_supported_families():
    message = _refusal(hf_model("ViTModel").embeddings)
    assert "Supported:" in message
    assert "It holds" not in message
