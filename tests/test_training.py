"""DynamicViT trains in mask mode: differentiable keep decisions, gradients reach the predictors,
and the predictors' weights stay out of the host's checkpoint."""

import pytest
import torch
from models import PATCHES, forward, host_model, images

import tokensieve as ts

METHOD = ts.DynamicViT(keep=0.5, layers=(1, 2))


@pytest.mark.parametrize("host", ["timm-vit", "ViTForImageClassification"])
def test_dynamicvit_training_gives_keep_decisions_and_predictor_gradients(host):
    model = host_model(host)
    host_keys = list(model.state_dict())
    sieve = ts.patch(model, METHOD)
    model.train()
    x = images(3)
    with ts.trace(model) as traces:
        output = model(x)
    logits = output if isinstance(output, torch.Tensor) else output.logits
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2]))
    loss.backward()

    trace = traces[0]
    assert [d.layer for d in trace.keep_decisions] == list(METHOD.layers)
    assert [d.target for d in trace.keep_decisions] == pytest.approx([0.5, 0.25])
    for decision in trace.keep_decisions:
        assert decision.decisions.shape == (3, PATCHES)
        assert ((decision.decisions == 0) | (decision.decisions == 1)).all()
    first, second = (d.decisions for d in trace.keep_decisions)
    assert (second <= first).all()  # a token dropped at one stage stays dropped
    assert (trace.kept_tokens() == trace.input_tokens).all()  # mask mode: dense token count

    predictor_parameters = list(sieve.parameters())
    assert predictor_parameters
    assert all(p.grad is not None for p in predictor_parameters)
    assert all(p.grad.abs().sum() > 0 for p in predictor_parameters if p.dim() > 1)
    assert any(p.grad is not None for p in model.parameters())  # the host trains too

    assert list(model.state_dict()) == host_keys
    sieve_keys = set(sieve.state_dict())
    assert sieve_keys == {name for name, _ in sieve.named_parameters()}
    assert not sieve_keys & set(host_keys)
    assert sum(p.numel() for p in predictor_parameters) < sum(p.numel() for p in model.parameters())


def test_sieve_checkpoint_restores_the_predictors_on_a_fresh_patch():
    model = host_model("timm-vit")
    sieve = ts.patch(model, METHOD)
    with torch.no_grad():
        for p in sieve.parameters():
            p.add_(torch.randn_like(p))
    x = images(2)
    expected = forward(model, x)
    fresh = host_model("timm-vit")
    fresh_sieve = ts.patch(fresh, METHOD)
    assert forward(fresh, x)["out"].sub(expected["out"]).abs().max() > 1e-4  # new predictors differ
    fresh_sieve.load_state_dict(sieve.state_dict())
    assert torch.equal(forward(fresh, x)["out"], expected["out"])


def test_dynamicvit_inference_after_training_is_deterministic_and_prunes():
    model = host_model("timm-vit")
    ts.patch(model, METHOD)
    model.train()
    model(images(2)).sum().backward()
    model.eval()
    x = images(2)
    with ts.trace(model) as traces:
        first, second = forward(model, x), forward(model, x)
    assert torch.equal(first["out"], second["out"])
    assert traces[0].keep_decisions == []
    assert traces[0].kept_tokens()[-1].tolist() == [1 + int(PATCHES * 0.25)] * 2
