"""fit with precision="bf16": the forward and losses run under bfloat16 autocast, the weights,
gradients and optimiser state stay fp32, and training still learns."""

import pytest
import torch
from test_train_support import (
    DYNAMICVIT,
    easy_dataset,
    patched_model,
    quiet_config,
    random_dataset,
    tiny_model,
)

from tokensieve.train import TrainConfig, cross_entropy, fit


def _accuracy(model, dataset) -> float:
    images, labels = dataset.tensors
    model.eval()
    with torch.no_grad():
        return (model(images).argmax(-1) == labels).float().mean().item()


def test_precision_must_be_fp32_or_bf16():
    with pytest.raises(ValueError, match="'fp32' or 'bf16'"):
        TrainConfig(steps=1, precision="fp16")


def test_a_bf16_step_gives_fp32_gradients_close_to_the_fp32_step():
    grads = {}
    for precision in ("fp32", "bf16"):
        model = tiny_model()
        fit(model, random_dataset(8), cross_entropy,
            quiet_config(train="model", steps=1, batch_size=8, lr=0.0, precision=precision))
        grads[precision] = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    fp32, bf16 = grads["fp32"], grads["bf16"]
    assert not torch.equal(fp32, bf16)  # the bf16 step did run in lower precision
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16, dim=0)
    assert cosine > 0.99, cosine


def test_a_model_learns_in_bf16():
    model, data = tiny_model(), easy_dataset(256)
    before = _accuracy(model, data)
    fit(model, data, cross_entropy,
        quiet_config(train="model", steps=60, batch_size=32, lr=3e-3, warmup_steps=5, precision="bf16"))
    assert _accuracy(model, data) > max(0.6, before + 0.3)


def test_a_method_trains_in_bf16_with_its_keep_ratio_and_distillation_losses():
    model = patched_model(DYNAMICVIT)
    result = fit(model, easy_dataset(64), cross_entropy, quiet_config(steps=3, precision="bf16"))
    last = result.history[-1]
    assert all(torch.isfinite(torch.tensor(value)) for value in (last.loss, last.loss_keep_ratio,
                                                                   last.loss_distill))
