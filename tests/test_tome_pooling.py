"""ToMe under heads that average the patch tokens: every merged token counts as often as the input
tokens it stands for."""

import pytest
import torch
from models import PATCHES, forward, host_model, images, strengthen

import tokensieve as ts

METHOD = ts.ToMe(r=8)


@pytest.mark.parametrize(("classifier", "base", "prefix"), [
    ("Dinov2ForImageClassification", "Dinov2Model", 1),
    ("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersModel", 5),
])
def test_tome_mean_pooled_logits_equal_size_weighted_pooling_of_the_merged_tokens(classifier, base, prefix):
    x = images(2)
    model = strengthen(host_model(classifier))
    dense = forward(model, x)["logits"]
    ts.patch(model, METHOD)

    # The same weights as a CLS-pooled base model: its output is the merged tokens themselves.
    merged_model = host_model(base, seed=1)
    merged_model.load_state_dict(model.base_model.state_dict())
    ts.patch(merged_model, METHOD)
    merged = forward(merged_model, x)["last_hidden_state"]  # [B, prefix + N', C]
    assert merged.shape[1] == prefix + PATCHES - METHOD.r * 4

    # The classifier's base output repeats each merged token `size` times (back to the input count).
    repeated = forward(model.base_model, x)["last_hidden_state"]
    assert repeated.shape[1] == prefix + PATCHES
    torch.testing.assert_close(repeated[:, :prefix], merged[:, :prefix], atol=1e-5, rtol=0)
    sizes = torch.zeros(merged.shape[:2])
    for b in range(len(x)):
        for row in repeated[b, prefix:]:
            match = ((merged[b, prefix:] - row).abs().amax(dim=1) <= 1e-5).nonzero().flatten()
            assert match.numel() == 1, "every repeated row is exactly one merged token"
            sizes[b, prefix + match] += 1
    assert (sizes[:, :prefix] == 0).all() and (sizes.sum(dim=1) == PATCHES).all()
    assert (sizes[:, prefix:] >= 1).all() and (sizes > 1).any()

    patches = merged[:, prefix:]
    weights = sizes[:, prefix:, None]
    pooled = torch.cat([merged[:, 0], (patches * weights).sum(dim=1) / weights.sum(dim=1)], dim=1)
    with torch.no_grad():
        expected = model.classifier(pooled)
    got = forward(model, x)["logits"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    unweighted = torch.cat([merged[:, 0], patches.mean(dim=1)], dim=1)
    with torch.no_grad():
        assert (model.classifier(unweighted) - got).abs().max() > 1e-4  # the weighting matters here
    assert (got - dense).abs().max() > 1e-4


@pytest.mark.parametrize(("host", "prefix", "mean_pooled"), [
    ("Dinov2ForImageClassification", 1, True),
    ("Dinov2WithRegistersForImageClassification", 5, True),
    ("timm-reg-gap", 5, True),
    ("Dinov2Model", 1, False),
    ("ViTForImageClassification", 1, False),
    ("timm-vit", 1, False),
])
def test_tome_output_token_count_is_the_input_count_only_for_mean_pooled_heads(host, prefix, mean_pooled):
    model = host_model(host)
    x = images(2)
    ts.patch(model, METHOD)
    with torch.no_grad():
        features = model.forward_features(x) if hasattr(model, "forward_features") else \
            model.base_model(x).last_hidden_state
    expected = prefix + (PATCHES if mean_pooled else PATCHES - METHOD.r * 4)
    assert features.shape[1] == expected


def test_tome_timm_avg_pool_equals_size_weighted_mean_of_the_merged_tokens():
    x = images(2)
    model = strengthen(host_model("timm-reg-gap"))
    ts.patch(model, METHOD)
    token_pooled = host_model("timm-reg-gap", seed=1, global_pool="token", fc_norm=True)
    token_pooled.load_state_dict(model.state_dict())
    ts.patch(token_pooled, METHOD)
    with torch.no_grad():
        merged = token_pooled.forward_features(x)  # [B, 5 + N', C]: the merged tokens
        repeated = model.forward_features(x)
        # mean over the repeated rows == sum over distinct merged rows weighted by their multiplicity
        counts = ((repeated[:, 5:, None] - merged[:, None, 5:]).abs().amax(dim=-1) <= 1e-5).sum(dim=1)
        assert (counts.sum(dim=1) == PATCHES).all() and (counts > 1).any()
        weighted = (merged[:, 5:] * counts[..., None]).sum(dim=1) / PATCHES
        expected = model.head(model.fc_norm(weighted))
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
