"""Left-padded text batches: CLIP's text tower runs them (it finds the token it pools from the ids,
and holds it first whatever the padding); BLIP's text encoder refuses them (its ITM head reads
position 0, which is padding there)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from models import (
    TEXT_EOS,
    blip_retrieval,
    calibrate_predictors,
    clip_text_model,
    kept_positions,
    predictors,
    sharpen_attention,
    texts,
)
from registry import CLIP_TEXT, methods

import tokensieve as ts

TOLERANCE = 1e-5
LENGTHS = [12, 9, 5]
WIDTH = max(LENGTHS)
PADDED = dataclasses.replace(CLIP_TEXT, padded=True)
PER_TEXT = methods("pruned", "ragged", host=PADDED)


def left_padded_texts() -> tuple[torch.Tensor, torch.Tensor]:
    """The texts of `texts(LENGTHS)` with their padding moved in front of them."""
    ids, mask = texts(LENGTHS)
    for i, length in enumerate(LENGTHS):
        ids[i] = ids[i].roll(WIDTH - length)
        mask[i] = mask[i].roll(WIDTH - length)
    return ids, mask


def _assert_same_text(got, expected, i: int, j: int, mask: torch.Tensor) -> None:
    """Row i of `got` and row j of `expected` agree on the pooled features and on every real token."""
    real = mask[i].bool()
    torch.testing.assert_close(got.pooler_output[i], expected.pooler_output[j], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(got.last_hidden_state[i][real], expected.last_hidden_state[j][real],
                               atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("host", ["CLIPTextModel", "CLIPTextModelWithProjection"])
@pytest.mark.parametrize("method", methods("off", host=PADDED))
def test_left_padded_clip_text_with_pruning_off_equals_the_host_on_its_text(host, attention, method):
    model = clip_text_model(host, attn_implementation=attention)
    ids, mask = left_padded_texts()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask)
        ts.patch(model, method)
        keep_all = model(input_ids=ids, attention_mask=mask)
        with ts.pruning_disabled(model):
            disabled = model(input_ids=ids, attention_mask=mask)
    pooled = "text_embeds" if host == "CLIPTextModelWithProjection" else "pooler_output"
    for got in (keep_all, disabled):
        torch.testing.assert_close(got[pooled], expected[pooled], atol=TOLERANCE, rtol=0)
        real = mask.bool()
        torch.testing.assert_close(got.last_hidden_state[real], expected.last_hidden_state[real],
                                   atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("method", PER_TEXT)
def test_left_padded_clip_text_with_pruning_equals_each_text_alone(method):
    model = sharpen_attention(clip_text_model())
    ids, mask = left_padded_texts()
    ts.patch(model, method)
    if isinstance(method, ts.DynamicViT):
        calibrate_predictors(model, input_ids=ids, attention_mask=mask)
        with torch.no_grad():  # off the median token's score, which rounding would put either side of 0
            for predictor in predictors(ts.sieve_of(model)):
                predictor.head[-1].bias[1] += 1e-3
    with torch.no_grad(), ts.trace(model) as traces:
        batch = model(input_ids=ids, attention_mask=mask)
    assert (kept_positions(traces[0]) < torch.tensor(LENGTHS)).all()  # every text was pruned
    for record in traces[0].layers:  # the pooled end-of-text token and the text's first token stay
        assert torch.equal(record.index[:, 0], torch.full((3,), WIDTH - 1))
        assert torch.equal(record.index[:, 1], WIDTH - torch.tensor(LENGTHS))
    for i in range(len(LENGTHS)):
        with torch.no_grad():  # the same row alone, its padding included: positions count from its start
            alone = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])
        _assert_same_text(batch, alone, i, 0, mask)


def test_left_padding_with_the_end_of_text_id_is_refused_since_the_host_would_pool_padding():
    """Padding with the end-of-text id (as CLIP's own tokenizer does) puts the first end-of-text id,
    which the tower pools, on the padding when it comes first."""
    model = clip_text_model()
    ids, mask = left_padded_texts()
    ids[mask == 0] = TEXT_EOS
    ts.patch(model, ts.TopK(keep=0.5, layers=(1,)))
    for context in (ts.pruning_disabled(model), torch.no_grad()):
        with context, pytest.raises(ValueError, match=r"end-of-text token .* is padding.*on the right"):
            model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("disabled", [False, True])
def test_left_padded_blip_text_is_refused_with_pruning_on_or_off(disabled):
    encoder = blip_retrieval().text_encoder
    ids, mask = left_padded_texts()
    ts.patch(encoder, ts.TopK(keep=0.5, layers=(1,)))
    context = ts.pruning_disabled(encoder) if disabled else torch.no_grad()
    with context, pytest.raises(ValueError, match="pad sequences on the right"):
        encoder(input_ids=ids, attention_mask=mask)
