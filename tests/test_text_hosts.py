"""Text towers: CLIP's causal text encoder (pooled at the end-of-text token) and BLIP's text encoder
(post-norm layers cross-attending to image tokens), with padded text and padded image tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from flop_counting import counted_macs
from models import (
    TEXT_EOS,
    blip_retrieval,
    calibrate_predictors,
    clip_text_model,
    distinct_images,
    kept_positions,
    sharpen_attention,
    texts,
)
from registry import BLIP_TEXT, CLIP_TEXT, REGISTRY, methods
from torch import nn

import tokensieve as ts
from tokensieve import ops
from tokensieve.executor import causal_positions
from tokensieve.hosts.hf_blip_text import keep_cross_attention_mask
from tokensieve.tokens import TokenState

TOLERANCE = 1e-5
LENGTHS = [12, 9, 5]  # three texts, padded to 12 tokens


def _outputs(output) -> dict[str, torch.Tensor]:
    return {key: value for key, value in output.items() if isinstance(value, torch.Tensor)}


def _assert_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=TOLERANCE, rtol=0, msg=key)


def _run(model, **inputs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return _outputs(model(**inputs))


# --- pruning off equals the host -------------------------------------------------------------------

CLIP_OFF = [  # (class, the host's attention implementation, padded texts)
    ("CLIPTextModel", "sdpa", True),
    ("CLIPTextModel", "sdpa", False),
    ("CLIPTextModel", "eager", True),
    ("CLIPTextModelWithProjection", "sdpa", True),
    ("CLIPTextModelWithProjection", "eager", False),
]
def _clip_off_cases() -> list:
    cases = []
    for host, attention, padded in CLIP_OFF:
        for param in methods("off", host=dataclasses.replace(CLIP_TEXT, padded=padded)):
            cases.append(pytest.param(host, attention, padded, *param.values,
                                      id=f"{host}-{attention}-{'padded' if padded else 'full'}-{param.id}"))
    return cases


@pytest.mark.parametrize(("host", "attention", "padded", "method"), _clip_off_cases())
def test_clip_text_with_pruning_off_equals_host_at_every_position(host, attention, padded, method):
    model = clip_text_model(host, attn_implementation=attention)
    ids, mask = texts(LENGTHS if padded else [12, 12, 12])
    expected = _run(model, input_ids=ids, attention_mask=mask)
    ts.patch(model, method)
    _assert_close(_run(model, input_ids=ids, attention_mask=mask), expected)


def test_clip_model_text_features_with_pruning_off_equal_host():
    model = clip_text_model("CLIPModel")
    ids, mask = texts(LENGTHS)
    with torch.no_grad():
        expected = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        ts.patch(model.text_model, ts.TopK(keep=1.0, layers=(1,)))
        got = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


def test_clip_text_padded_with_end_tokens_and_no_mask_pools_at_the_first_end_token():
    """CLIP tokenizers may pad with the end token; the host pools at its first occurrence."""
    model = clip_text_model()
    ids, _ = texts(LENGTHS)
    ids[ids == 0] = TEXT_EOS
    expected = _run(model, input_ids=ids)
    ts.patch(model, ts.TopK(keep=0.3, layers=(1,)))
    with ts.trace(model) as traces:
        _run(model, input_ids=ids)
    ends = torch.tensor(LENGTHS) - 1
    for record in traces[0].layers:
        assert torch.equal(record.index[:, 0], ends)  # the pooled token goes through every block
    ts.patch(model, ts.TopK(keep=1.0, layers=(1,)))
    _assert_close(_run(model, input_ids=ids), expected)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("method", methods("off", host=dataclasses.replace(BLIP_TEXT, padded=True)))
def test_blip_itm_and_itc_with_pruning_off_equal_host(method, attention):
    model = blip_retrieval()
    ids, mask = texts(LENGTHS)
    pixels = distinct_images()[:, :, :32, :32]
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    itm, itc = _run(model, **inputs), _run(model, **inputs, use_itm_head=False)
    ts.patch(model.text_encoder, method, attention=attention)
    _assert_close(_run(model, **inputs), itm)
    _assert_close(_run(model, **inputs, use_itm_head=False), itc)


def _image_tokens(batch: int, counts: list[int], width: int = 48, seed: int = 0):
    """Image tokens padded to the longest count with garbage (so that attending it would show), and
    the mask marking them."""
    generator = torch.Generator().manual_seed(seed)
    memory = torch.randn(batch, max(counts), width, generator=generator)
    mask = torch.zeros(batch, max(counts), dtype=torch.long)
    for i, count in enumerate(counts):
        mask[i, :count] = 1
        memory[i, count:] = 1e3
    return memory, mask


def test_blip_text_encoder_with_padded_image_tokens_and_pruning_off_equals_host_on_each_sample():
    """transformers' BlipTextAttention never passes `encoder_attention_mask` on, so the host itself
    attends padded image tokens; its reference is each sample with its own image tokens only."""
    encoder = blip_retrieval().text_encoder
    ids, mask = texts(LENGTHS)
    counts = [17, 11, 6]
    memory, memory_mask = _image_tokens(3, counts)
    expected = [_run(encoder, input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1],
                     encoder_hidden_states=memory[i : i + 1, :count])["last_hidden_state"][0]
                for i, count in enumerate(counts)]
    ts.patch(encoder, ts.EViT(keep=1.0, layers=(0, 2)))
    got = _run(encoder, input_ids=ids, attention_mask=mask, encoder_hidden_states=memory,
               encoder_attention_mask=memory_mask)["last_hidden_state"]
    for i in range(3):  # every position, the text's padding included
        torch.testing.assert_close(got[i], expected[i], atol=TOLERANCE, rtol=0)


def test_keep_cross_attention_mask_makes_the_unpatched_blip_text_encoder_skip_image_padding():
    encoder = keep_cross_attention_mask(keep_cross_attention_mask(blip_retrieval().text_encoder))
    ids, mask = texts(LENGTHS)
    counts = [17, 11, 6]
    memory, memory_mask = _image_tokens(3, counts)
    got = _run(encoder, input_ids=ids, attention_mask=mask, encoder_hidden_states=memory,
               encoder_attention_mask=memory_mask)["last_hidden_state"]
    for i, count in enumerate(counts):
        alone = _run(encoder, input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1],
                     encoder_hidden_states=memory[i : i + 1, :count])["last_hidden_state"][0]
        torch.testing.assert_close(got[i], alone, atol=TOLERANCE, rtol=0)
    with pytest.raises(TypeError, match="BlipTextModel"):
        keep_cross_attention_mask(nn.Linear(2, 2))


# --- pruned runs against slow references -----------------------------------------------------------

def _clip_alone(model, ids, mask, i):
    length = int(mask[i].sum())
    with torch.no_grad():
        return model(input_ids=ids[i : i + 1, :length])


@pytest.mark.parametrize("method", [
    *methods("pruned", "ragged", host=dataclasses.replace(CLIP_TEXT, padded=True)),
    pytest.param(ts.TopK(keep=0.5, layers=(0, 2)), id="topk-first-layer"),
    pytest.param(ts.EViT(keep=0.4, layers=(1,), fuse=False), id="evit-nofuse-one-layer"),
])
def test_clip_text_padded_batch_with_pruning_equals_each_text_alone(method):
    model = sharpen_attention(clip_text_model())
    ids, mask = texts(LENGTHS)
    ts.patch(model, method)
    if isinstance(method, ts.DynamicViT):
        calibrate_predictors(model, input_ids=ids, attention_mask=mask)
    if isinstance(method, ts.SViT) and method.ragged:  # thresholds that split an untrained gate's ratings
        ts.calibrate(model, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad(), ts.trace(model) as traces:
        batch = model(input_ids=ids, attention_mask=mask)
    assert (kept_positions(traces[0]) < torch.tensor(LENGTHS)).all()  # every text was pruned
    for i, length in enumerate(LENGTHS):
        alone = _clip_alone(model, ids, mask, i)
        torch.testing.assert_close(batch.pooler_output[i], alone.pooler_output[0], atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(batch.last_hidden_state[i, :length], alone.last_hidden_state[0],
                                   atol=TOLERANCE, rtol=0)


def _clip_reference(model, ids, mask, trace) -> torch.Tensor:
    """CLIP's text tower run from its own layers with explicit masks: at each block, queries attend the
    active tokens at earlier or equal positions; tokens pruned after attention keep their features."""
    tokens = ids.shape[1]
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    active = mask.bool()
    with torch.no_grad():
        x = model.embeddings(input_ids=ids)
        for layer, record in zip(model.encoder.layers, trace.layers, strict=True):
            allowed = causal & active[:, None, :]
            bias = torch.zeros(allowed.shape).masked_fill(~allowed, -torch.inf)[:, None]
            h = x + layer.self_attn(layer.layer_norm1(x), attention_mask=bias)[0]
            kept = torch.zeros_like(active)
            for b in range(len(ids)):
                positions = record.index[b]
                kept[b, positions[positions >= 0]] = True
            out = h + layer.mlp(layer.layer_norm2(h))
            x = torch.where(kept[..., None], out, torch.where(active[..., None], h, x))
            active = kept & mask.bool()
        return model.final_layer_norm(x)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_clip_text_pruned_run_equals_a_masked_reference(attention):
    model = sharpen_attention(clip_text_model())
    ids, mask = texts(LENGTHS)
    ts.patch(model, ts.TopK(keep=0.5, layers=(0, 1)), attention=attention)
    with torch.no_grad(), ts.trace(model) as traces:
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    ts.unpatch(model)
    expected = _clip_reference(model, ids, mask, traces[0])
    for i, length in enumerate(LENGTHS):
        torch.testing.assert_close(got[i, :length], expected[i, :length], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("dense", [False, True], ids=["gather", "dense"])
@pytest.mark.parametrize("method", [
    *methods("pruned", "ragged", host=dataclasses.replace(BLIP_TEXT, padded=True)),
    pytest.param(ts.TopK(keep=0.5, layers=(0, 2)), id="topk-first-layer"),
])
def test_blip_text_padded_batch_with_padded_image_tokens_equals_each_sample_alone(method, dense):
    encoder = sharpen_attention(blip_retrieval().text_encoder)
    ids, mask = texts(LENGTHS)
    image_counts = [17, 11, 6]
    memory, memory_mask = _image_tokens(3, image_counts)
    torch.manual_seed(1)  # the method's learnable parts (MADTP's bank sets its counts) drawn alike each run
    ts.patch(encoder, method, dense=dense)
    with torch.no_grad(), ts.trace(encoder) as traces:
        batch = encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=memory,
                        encoder_attention_mask=memory_mask).last_hidden_state
    assert (traces[0].kept_tokens()[-1] < torch.tensor(LENGTHS)).all()  # every text was pruned
    for i, (length, count) in enumerate(zip(LENGTHS, image_counts, strict=True)):
        with torch.no_grad():
            alone = encoder(input_ids=ids[i : i + 1, :length],
                            encoder_hidden_states=memory[i : i + 1, :count]).last_hidden_state
        rows = length if dense else 1  # gathered rows differ in layout; row 0 is the [CLS] token
        torch.testing.assert_close(batch[i, :rows], alone[0, :rows], atol=TOLERANCE, rtol=0)


def test_a_ragged_vision_tower_feeds_the_text_encoder_through_its_output_mask():
    model = blip_retrieval()
    sharpen_attention(model.vision_model, 12.0)  # peaked class attention: images keep different counts
    pixels = distinct_images()[:, :, :32, :32]
    ids, mask = texts(LENGTHS)
    ts.patch(model.vision_model, ts.TopK(mass=0.5, layers=(0,)))
    ts.patch(model.text_encoder, ts.TopK(keep=0.5, layers=(1,)))
    with torch.no_grad(), ts.trace(model.vision_model) as traces:
        image = model.vision_model(pixel_values=pixels).last_hidden_state
    image_mask = traces[0].output_mask()
    assert image_mask.shape == image.shape[:2] and len(set(image_mask.sum(dim=1).tolist())) > 1
    with torch.no_grad():
        text = model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image,
                                  encoder_attention_mask=image_mask).last_hidden_state
        itm = model.itm_head(text[:, 0])
    for i, length in enumerate(LENGTHS):
        with torch.no_grad():
            alone = model(input_ids=ids[i : i + 1, :length], pixel_values=pixels[i : i + 1]).itm_score
        torch.testing.assert_close(itm[i], alone[0], atol=TOLERANCE, rtol=0)


# --- what pruning may never remove -----------------------------------------------------------------

def test_clip_text_pruning_keeps_the_end_token_the_first_token_and_one_more():
    model = sharpen_attention(clip_text_model())
    ids, mask = texts(LENGTHS)
    for method in (ts.TopK(keep=0.01, layers=(0, 1, 2)), ts.EViT(keep=0.01, layers=(0, 2), fuse=False)):
        ts.patch(model, method)
        with torch.no_grad(), ts.trace(model) as traces:
            model(input_ids=ids, attention_mask=mask)
        for record in traces[0].layers:
            assert torch.equal(record.index[:, 0], torch.tensor(LENGTHS) - 1)  # end-of-text
            assert torch.equal(record.index[:, 1], torch.zeros(3, dtype=torch.long))  # first token
        assert traces[0].kept_tokens()[-1].tolist() == [3, 3, 3]  # end, first, and one more


def test_blip_text_evit_keeps_the_first_token_and_fuses_per_text():
    encoder = sharpen_attention(blip_retrieval().text_encoder)
    ids, mask = texts(LENGTHS)
    ts.patch(encoder, ts.EViT(keep=0.01, layers=(1,)))
    with torch.no_grad(), ts.trace(encoder) as traces:
        out = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    last = traces[0].layers[-1]
    assert (last.index[:, 0] == 0).all()
    assert last.valid.sum(dim=1).tolist() == [3, 3, 3]  # [CLS], one kept token, the fused token
    assert out.shape[1] == 3 and torch.isfinite(out).all()


# --- FLOPs -------------------------------------------------------------------------------------------

CLIP_FLOPS = [(ts.TopK(keep=0.5, layers=(1,)), "sdpa"), (ts.DynamicViT(keep=0.6, layers=(1,)), "sdpa"),
              (ts.EViT(keep=0.5, layers=(0, 2), fuse=False), "eager")]
BLIP_FLOPS = [(ts.TopK(keep=0.5, layers=(1,)), "eager"), (ts.EViT(keep=0.5, layers=(0, 2)), "sdpa")]


@pytest.mark.parametrize(("method", "attention"), CLIP_FLOPS, ids=str)
def test_clip_text_flops_agree_with_flop_counter_mode(method, attention):
    model = clip_text_model("CLIPTextModelWithProjection")
    ids, _ = texts([12, 12])
    ts.patch(model, method, attention=attention)
    report = ts.flops(model, {"input_ids": ids})
    assert report.macs < report.dense_macs
    assert report.macs == pytest.approx(counted_macs(model, {"input_ids": ids}, batch=2), rel=0.01)


@pytest.mark.parametrize(("method", "attention"), BLIP_FLOPS, ids=str)
def test_blip_text_flops_with_cross_attention_agree_with_flop_counter_mode(method, attention):
    encoder = blip_retrieval().text_encoder
    ids, _ = texts([12, 12])
    inputs = {"input_ids": ids, "encoder_hidden_states": _image_tokens(2, [17, 17])[0]}
    ts.patch(encoder, method, attention=attention)
    report = ts.flops(encoder, inputs)
    assert report.macs < report.dense_macs
    assert report.macs == pytest.approx(counted_macs(encoder, inputs, batch=2), rel=0.01)
    ts.unpatch(encoder)
    dense = ts.flops(encoder, inputs)  # the host itself, counted without pruning
    assert dense.macs == pytest.approx(report.dense_macs, rel=1e-9)
    assert dense.macs == pytest.approx(counted_macs(encoder, inputs, batch=2), rel=1e-6)


def test_padded_text_flops_count_each_text_by_its_own_tokens():
    encoder = blip_retrieval().text_encoder
    ids, mask = texts(LENGTHS)
    memory, memory_mask = _image_tokens(3, [17, 11, 6])
    ts.patch(encoder, ts.TopK(keep=0.5, layers=(1,)))
    report = ts.flops(encoder, {"input_ids": ids, "attention_mask": mask, "encoder_hidden_states": memory,
                                "encoder_attention_mask": memory_mask})
    for i, (length, count) in enumerate(zip(LENGTHS, [17, 11, 6], strict=True)):
        alone = ts.flops(encoder, {"input_ids": ids[i : i + 1, :length],
                                   "encoder_hidden_states": memory[i : i + 1, :count]})
        assert report.per_sample[i] == pytest.approx(alone.macs, rel=1e-9)
    assert len(set(report.per_sample)) == 3


# --- patching, errors -------------------------------------------------------------------------------

def test_unpatching_a_text_tower_restores_it_exactly():
    model = clip_text_model("CLIPTextModelWithProjection")
    ids, mask = texts(LENGTHS)
    keys = set(model.state_dict())
    expected = _run(model, input_ids=ids, attention_mask=mask)
    ts.patch(model, ts.TopK(keep=0.5, layers=(1,)))
    assert set(model.state_dict()) == keys
    pruned = _run(model, input_ids=ids, attention_mask=mask)
    assert not torch.allclose(pruned["text_embeds"], expected["text_embeds"], atol=1e-4)
    ts.unpatch(model)
    assert "forward" not in vars(model.text_model.embeddings)
    assert all("forward" not in vars(layer) for layer in model.text_model.encoder.layers)
    for key, value in _run(model, input_ids=ids, attention_mask=mask).items():
        assert torch.equal(value, expected[key]), key


def test_masks_tokensieve_cannot_read_are_refused():
    model = clip_text_model()
    ids, _ = texts([12, 12])
    ts.patch(model, ts.TopK(keep=0.5, layers=(1,)))
    block_diagonal = torch.zeros(2, 1, 12, 12)
    block_diagonal[..., 6:, :6] = -torch.inf
    with pytest.raises(ValueError, match="causal order and key padding alone"):
        model(input_ids=ids, attention_mask=block_diagonal)
    with pytest.raises(ValueError, match="attention maps"):
        model(input_ids=ids, output_attentions=True)
    with pytest.raises(ValueError, match="bias"):
        ops.key_mask(torch.randn(2, 1, 12, 12), 12)


@pytest.mark.parametrize("method", [pytest.param(entry.pruned, id=entry.name)
                                    for entry in REGISTRY if entry.fuses])
def test_merging_is_refused_on_clip_text_and_fusing_runs_causally(method):
    model = clip_text_model()
    ids, _ = texts([12, 12])
    if not method.keeps_positions:  # merging: refused at once, for the output is read by position
        with pytest.raises(ValueError, match="merges tokens"):
            ts.patch(model, method)
        return
    ts.patch(model, method)  # fusing (EViT's, MADTP's token): the fused token sits at the text's end
    with ts.trace(model) as traces:
        out = model(input_ids=ids).pooler_output
    assert torch.isfinite(out).all()
    assert any((layer.index == -1).any() for layer in traces[0].layers)  # a fused token ran


def test_a_fused_token_on_a_causal_tower_attends_to_all_and_only_the_last_token_attends_to_it():
    # one text of positions 0..4 (4 its end), position 2 fused away, then input padding at 5
    index = torch.tensor([[4, 0, 1, 3, 5, -1]])
    valid = torch.tensor([[True, True, True, True, False, True]])
    state = TokenState(x=torch.zeros(1, 6, 2), index=index, prefix=2, valid=valid)
    assert causal_positions(state).tolist() == [[4, 0, 1, 3, 5, 4]]  # at the last real position
    allowed = ops.causal_mask(causal_positions(state), valid)[0, 0]
    assert allowed[5].tolist() == [True, True, True, True, False, True]  # the fused token reads all
    # the end alone reads it (and the padding row, whose output no one reads)
    assert allowed[:, 5].tolist() == [True, False, False, False, True, True]


@pytest.mark.parametrize("method", [pytest.param(entry.pruned, id=entry.name)
                                    for entry in REGISTRY if entry.equal_counts])
def test_methods_that_need_equal_counts_are_refused_on_padded_text(method):
    encoder = blip_retrieval().text_encoder
    ids, mask = texts(LENGTHS)
    ts.patch(encoder, method)
    with pytest.raises(ValueError, match="cannot run on a padded batch"):
        encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=_image_tokens(3, [17, 17, 17])[0])


def test_left_padded_blip_text_is_refused_and_decoding_with_a_cache_too():
    encoder = blip_retrieval().text_encoder
    ids, mask = texts(LENGTHS)
    ts.patch(encoder, ts.TopK(keep=0.5, layers=(1,)))
    with pytest.raises(ValueError, match="pad sequences on the right"):
        encoder(input_ids=ids, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="encoder"):
        encoder(input_ids=ids, attention_mask=mask, is_decoder=True, use_cache=True)


def test_policy_attention_keeping_every_token_is_masked_attention():
    generator = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 5, 4, generator=generator).unbind(0)
    index = torch.tensor([[4, 0, 1, 2, 3], [2, 0, 1, 3, 4]])
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    mask = ops.causal_mask(index, valid)
    got = ops.policy_attention(q, k, v, torch.ones(2, 5), 0.5, mask)
    torch.testing.assert_close(got, ops.attention(q, k, v, mask, 0.5))


def test_policy_attention_stays_finite_when_a_pruned_key_dominates():
    # Pruned key 0 outscores the kept keys by 200: shifting by the max over all keys would leave the
    # kept keys' exp() at 0 and the gradients at inf (DynamicViT's mask-mode training saw norms up to inf).
    generator = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 1, 1, 4, 4, generator=generator).unbind(0)
    q = 0.5 + 0.5 * torch.rand(1, 1, 4, 4, generator=generator)  # positive: key 0 = 60·ones outscores all
    k[..., 0, :] = 60.0
    logits = q @ k.transpose(-2, -1)
    assert (logits[..., 1:, 0] - logits[..., 1:, 1:].amax(-1) > 100).all()
    keep = torch.tensor([[0.0, 1.0, 1.0, 1.0]], requires_grad=True)
    q.requires_grad_(True)
    got = ops.policy_attention(q, k, v, keep, 1.0)
    plain = torch.zeros_like(got)  # query 0 attends to itself and the kept keys; the others to the kept keys
    for row in range(4):
        keys = [0, 1, 2, 3] if row == 0 else [1, 2, 3]
        plain[..., row, :] = (logits[..., row, keys].softmax(-1)[..., None] * v[..., keys, :]).sum(-2)
    torch.testing.assert_close(got, plain.detach())
    got.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(keep.grad).all()
    assert keep.grad.abs().max() < 1e3 and q.grad.abs().max() < 1e3


def test_padding_masks_of_every_form_read_as_the_same_key_validity():
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    padding = valid[:, None, None, :].expand(2, 1, 6, 6)
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~padding, torch.finfo(torch.float32).min)
    for mask in (valid.long(), valid, padding, additive):
        assert torch.equal(ops.key_mask(mask, 6), valid)
    assert torch.equal(ops.key_mask(padding & causal, 6, causal=True), valid)
    assert ops.key_mask(torch.ones(2, 6), 6) is None  # no padding: the equal-count fast path
    with pytest.raises(ValueError, match="key padding alone"):
        ops.key_mask(padding & causal, 6)  # a causal mask where the host attends both ways
