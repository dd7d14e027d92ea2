"""MADTP: alignment tokens shared by the towers guide per-sample pruning; each layer keeps the tokens
rated above an alignment-weighted threshold and merges the rest into one importance-weighted token."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from models import blip_retrieval, distinct_images, host_model, images, strengthen, texts
from torch import Tensor, nn

import tokensieve as ts
from tokensieve import ops
from tokensieve.flops import report_from_trace
from tokensieve.methods import madtp
from tokensieve.methods.madtp import IMPORTANCE_REPORT, POOLED_REPORT
from tokensieve.patch import runner_of

TOLERANCE = 1e-5
LAYER = 1  # the layer the reference prunes at


def _reference_block(block: nn.Module, x: Tensor, bank: Tensor, temperature: float) -> Tensor:
    """timm's block on one sample's tokens x [1, N, C] with MADTP after its self-attention, spelled
    out as the algorithm reads: token·bank scores on the block input; importance = the mean of the
    attention received (max over heads, summed over the non-class queries), the best match and
    the head-weighted class attention, the first two divided by their sums; threshold = min over
    alignment tokens of the softmax(S / T)-weighted importance; the rest merged by importance."""
    attn = block.attn
    heads = attn.num_heads
    scores = x[0, 1:] @ bank.T  # [N-1, M]
    normed = block.norm1(x)
    qkv = attn.qkv(normed).reshape(1, x.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[0]  # [H, N, N]
    per_head = (weights @ v[0])  # [H, N, d]
    x = x + block.ls1(attn.proj(per_head.transpose(0, 1).reshape(1, x.shape[1], -1)))
    tokens = x.shape[1] - 1
    received = torch.stack([max(weights[h, query, n] for h in range(heads)) for n in range(1, tokens + 1)
                            for query in range(1, tokens + 1)]).view(tokens, tokens).sum(dim=1)
    best = scores.max(dim=1).values
    norms = per_head.norm(dim=-1)  # [H, N]
    by_class = torch.stack([sum(norms[h, n] / norms[:, n].sum() * weights[h, 0, n] for h in range(heads))
                            for n in range(1, tokens + 1)])
    importance = (received / received.sum() + best / best.sum() + by_class) / 3
    threshold = min(float((scores[:, m] / temperature).softmax(dim=0) @ importance) for m in range(len(bank)))
    kept = importance > threshold
    if tokens - int(kept.sum()) >= 2:
        rest = ~kept
        merged = (importance[rest, None] * x[0, 1:][rest]).sum(dim=0) / importance[rest].sum()
        x = torch.cat([x[:, :1], x[:, 1:][:, kept], merged[None, None]], dim=1)
    return x + block.ls2(block.mlp(block.norm2(x)))


@pytest.mark.parametrize("map_in_blocks", [False, True], ids=["whole map", "map in blocks of rows"])
def test_a_pruned_layer_is_the_plain_algorithm_and_each_image_keeps_its_own_count(map_in_blocks, monkeypatch):
    if map_in_blocks:  # the 65 tokens' map summarised 32 query rows at a time
        monkeypatch.setattr(sys.modules["tokensieve.ops.attention"], "SUMMARY_BLOCK_FLOATS", 1)
    model = strengthen(host_model("timm-vit"))
    plain = copy.deepcopy(model)
    x = images(3)
    torch.manual_seed(0)
    sieve = ts.patch(model, ts.MADTP(temperature=8.0, layers=(LAYER,)))
    bank = sieve.shared["bank"].tokens.detach()
    with torch.no_grad(), ts.trace(model) as traces:
        pruned = model(x)
    counts = traces[0].kept_tokens()[LAYER]
    assert len(set(counts.tolist())) > 1 and bool((counts < traces[0].input_tokens).all())
    for b in range(3):
        with torch.no_grad():
            tokens = plain.norm_pre(plain._pos_embed(plain.patch_embed(x[b : b + 1])))
            for block in plain.blocks[:LAYER]:
                tokens = block(tokens)
            tokens = _reference_block(plain.blocks[LAYER], tokens, bank, 8.0)
            for block in plain.blocks[LAYER + 1 :]:
                tokens = block(tokens)
            expected = plain.forward_head(plain.norm(tokens))
        torch.testing.assert_close(pruned[b : b + 1], expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("bias", ["none", "padded keys", "causal", "additive"])
def test_the_attention_summary_in_blocks_of_query_rows_is_the_whole_maps(bias, monkeypatch):
    """A large map is summarised a block of query rows at a time: the same output, summary and
    gradients as the whole map; and without autograd, where the blocks share one buffer and are
    normalised in place, the same output and summary."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 8, requires_grad=True) for _ in range(3))
    queries = torch.ones(2, 70)
    queries[1, 60:] = 0.0
    masks = {"none": None, "padded keys": (torch.arange(70) < torch.tensor([[70], [60]]))[:, None, None],
             "causal": torch.ones(70, 70, dtype=torch.bool).tril()[None, None].expand(2, 1, 70, 70),
             "additive": torch.randn(2, 1, 70, 70)}
    mask = masks[bias]
    weights = ops.attention_weights(q, k, mask, 0.35)
    whole = ops.summarize_attention(weights, queries)
    expected = [weights @ v, whole.received, whole.first_row]
    monkeypatch.setattr(sys.modules["tokensieve.ops.attention"], "SUMMARY_BLOCK_FLOATS", 1)  # 32 rows
    output, summary = ops.attention_and_summary(q, k, v, mask, 0.35, queries)
    found = [output, summary.received, summary.first_row]
    for got, want in zip(found, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    grads = torch.autograd.grad(sum(t.square().sum() for t in found), (q, k, v))
    wanted = torch.autograd.grad(sum(t.square().sum() for t in expected), (q, k, v))
    for got, want in zip(grads, wanted, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():
        for floats in (1, 10**9):  # in blocks (the last one shorter), and whole
            monkeypatch.setattr(sys.modules["tokensieve.ops.attention"], "SUMMARY_BLOCK_FLOATS", floats)
            output, summary = ops.attention_and_summary(q, k, v, mask, 0.35, queries)
            for got, want in zip([output, summary.received, summary.first_row], expected, strict=True):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_the_batch_count_keeps_the_batchs_largest_count_in_every_image_by_importance():
    model = strengthen(host_model("timm-vit"))
    x = images(3)
    torch.manual_seed(0)
    ts.patch(model, ts.MADTP(temperature=8.0, layers=(LAYER,)))
    with torch.no_grad(), ts.trace(model) as traces:
        model(x)
    own = traces[0].reports[IMPORTANCE_REPORT][0]
    torch.manual_seed(0)
    ts.patch(model, ts.MADTP(temperature=8.0, layers=(LAYER,), batch_max=True))
    with torch.no_grad(), ts.trace(model) as traces:
        model(x)
    largest = int(own.kept.max())
    record = traces[0].layers[LAYER]
    assert traces[0].kept_tokens()[LAYER].tolist() == [1 + largest + 1] * 3  # class, kept, merged
    for b in range(3):  # the best-rated tokens at that count, whatever the image's own threshold
        best = own.importance[b].topk(largest).indices.sort().values + 1
        assert torch.equal(record.index[b, 1 : 1 + largest], best)
        assert record.index[b, -1] == -1  # the merged token


def test_temperature_zero_prunes_nothing_and_higher_prunes_more():
    model = strengthen(host_model("timm-vit"))
    x = images(2)
    expected = model(x)
    kept = []
    for temperature in (0.0, 2.0, 32.0):
        torch.manual_seed(0)
        ts.patch(model, ts.MADTP(temperature=temperature))
        with torch.no_grad(), ts.trace(model) as traces:
            out = model(x)
        kept.append(int(traces[0].kept_tokens()[-1].sum()))
        if temperature == 0.0:
            torch.testing.assert_close(out, expected, atol=TOLERANCE, rtol=0)
    assert kept[0] > kept[1] > kept[2]


def _towers(**settings) -> tuple[nn.Module, ts.Sieve]:
    model = blip_retrieval()
    torch.manual_seed(0)
    sieve = ts.patch([model.vision_model, model.text_encoder], ts.MADTP(**{"temperature": 16.0, **settings}))
    return model, sieve


def test_one_bank_serves_both_towers_with_a_projection_per_layer_where_widths_differ():
    sieve = _towers()[1]
    names = sorted(name for name, _ in sieve.named_parameters())
    assert names[0] == "shared.bank.tokens" and sieve.shared["bank"].tokens.shape == (100, 48)
    assert not hasattr(sieve.shared, "project0")  # the vision tower is 48 wide, as the bank
    assert len(sieve.shared["project1"]) == 3  # the text tower (32 wide): one per layer
    projected = _towers(project=True, alignment_width=24)[1]
    assert len(projected.shared["project0"]) == 2 and projected.shared["bank"].tokens.shape == (100, 24)


def _run_towers(model: nn.Module, pixels: Tensor, lengths: list[int]) -> list[ts.Trace]:
    ids, mask = texts(lengths)
    with ts.trace(model.vision_model) as image, ts.trace(model.text_encoder) as text:
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    return [*image, *text]


def test_start_layer_prunes_every_block_from_it_on_in_towers_of_different_depths():
    model = _towers(start_layer=1)[0]  # the vision tower has 2 blocks, the text tower 3
    with torch.no_grad():
        traces = _run_towers(model, distinct_images()[:, :, :32, :32], [5, 9, 12])
    for trace in traces:
        depth = len(trace.layers)
        assert [stage.layer for stage in trace.reports[IMPORTANCE_REPORT]] == list(range(1, depth))
        entering = trace.input_counts()
        assert torch.equal(trace.kept_tokens()[0], entering)  # block 0 runs every token
        assert bool((trace.kept_tokens()[-1] < entering).any())
    with pytest.raises(ValueError, match="start_layer=3"):  # past the vision tower's 2 blocks
        _towers(start_layer=3)


def test_the_alignment_loss_pulls_each_alignment_tokens_pooled_features_together_across_towers():
    model, sieve = _towers()
    model.train()
    traces = _run_towers(model, distinct_images()[:, :, :32, :32], [5, 9, 12])
    image, text = (trace.reports[POOLED_REPORT] for trace in traces)  # [B, M, W], summed over layers
    assert image.shape == text.shape == (3, 100, 48)
    expected = 0.1 * (1 - F.cosine_similarity(image, text, dim=-1)).mean()
    loss = sieve.method.losses(traces)["alignment"]
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert sieve.shared["bank"].tokens.grad.abs().sum() > 0
    assert model.text_encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert next(model.vision_model.parameters()).grad.abs().sum() > 0


def test_two_images_per_sentence_are_averaged_and_a_mismatched_batch_is_refused():
    model, sieve = _towers()
    model.train()
    pixels = distinct_images()[:, :, :32, :32]
    traces = _run_towers(model, pixels, [5, 9, 12])
    pairs = torch.cat([pixels[:2], pixels[1:]])  # image 0 of pairs 0-1, then image 1 of pairs 0-1
    ids, mask = texts([5, 9])
    with ts.trace(model.vision_model) as image, ts.trace(model.text_encoder) as text:
        model.vision_model(pixel_values=pairs)
        model.text_encoder(input_ids=ids, attention_mask=mask,
                           encoder_hidden_states=torch.zeros(2, 17, 48))
    pooled = image[0].reports[POOLED_REPORT]
    averaged = (pooled[:2] + pooled[2:]) / 2
    expected = 0.1 * (1 - F.cosine_similarity(averaged, text[0].reports[POOLED_REPORT], dim=-1)).mean()
    torch.testing.assert_close(sieve.method.losses([*image, *text])["alignment"], expected)
    with pytest.raises(ValueError, match="one tower ran 3 samples and the other 2"):
        sieve.method.losses([traces[0], text[0]])
    assert sieve.method.losses(traces[:1]) == {}  # one tower alone: nothing to align


def test_text_padding_is_never_a_candidate_or_merged():
    model = _towers()[0]
    ids, mask = texts([4, 12])
    with torch.no_grad(), ts.trace(model.text_encoder) as traces:
        model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=torch.zeros(2, 17, 48))
    first = traces[0].reports[IMPORTANCE_REPORT][0]
    assert bool((first.importance[0, 3:] == 0).all())  # the short text's padding rates nothing
    assert first.kept[0] <= 3
    for record in traces[0].layers:
        real = record.index[0][record.valid[0]] if record.valid is not None else record.index[0]
        assert bool((real < 4).all())  # only the short text's own positions (or merged, -1)


@pytest.mark.parametrize(("settings", "message"), [
    ({"temperature": -1.0}, "temperature"),
    ({"alignment_tokens": 0}, "alignment_tokens"),
    ({"layers": (7,)}, "MADTP"),
    ({"start_layer": 12}, "start_layer"),
    ({"layers": (1,), "start_layer": 1}, "either"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises((TypeError, ValueError), match=message):
        ts.patch(host_model("timm-vit"), ts.MADTP(**settings))


def _pairs() -> list[dict[str, Tensor]]:
    ids, mask = texts([5, 9, 12], seed=3)
    return [{"input_ids": ids, "attention_mask": mask, "pixel_values": distinct_images()[:, :, :32, :32]}]


def test_temperature_is_set_to_a_macs_budget_of_both_towers_together_and_stored_with_the_bank():
    model, sieve = _towers(alignment_tokens=8)  # tiny towers: a bank small beside them
    result = ts.calibrate_temperature(model, _pairs(), macs_budget=0.75)
    assert result.macs == pytest.approx(0.75 * result.dense_macs, rel=0.02)
    assert float(sieve.shared["bank"].temperature) == result.temperature > 0
    assert sieve.state_dict()["shared.bank.temperature"] == result.temperature
    batch = _pairs()[0]

    def reports() -> list:  # each tower's own report of one forward
        with torch.no_grad(), ts.trace(model.vision_model) as image, ts.trace(model.text_encoder) as text:
            model(**batch)
        return [report_from_trace(runner_of(tower).host, traces[0])
                for tower, traces in ((model.vision_model, image), (model.text_encoder, text))]

    pruned = reports()
    sieve.shared["bank"].temperature.fill_(0.0)
    unpruned = reports()
    assert sum(report.macs for report in pruned) == pytest.approx(result.macs)
    # the dense figure is the unpruned forward's: a pruned one counts the text tower's
    # cross-attention over the surviving image tokens only
    assert sum(report.dense_macs for report in unpruned) == pytest.approx(result.dense_macs)
    assert pruned[1].dense_macs < unpruned[1].dense_macs


def test_a_budget_out_of_reach_or_without_madtp_is_refused_and_leaves_t_as_it_was():
    model, sieve = _towers(alignment_tokens=8)
    with pytest.raises(ts.BudgetOutOfReach, match="give a larger budget"):
        ts.calibrate_temperature(model, _pairs(), macs_budget=0.01)
    assert float(sieve.shared["bank"].temperature) == 16.0
    # T > 0 already prunes this much
    with pytest.raises(ts.BudgetOutOfReach, match="the share jumps across it"):
        ts.calibrate_temperature(model, _pairs(), macs_budget=0.9)
    assert float(sieve.shared["bank"].temperature) == 16.0
    assert ts.calibrate_temperature(model, _pairs(), macs_budget=1.0).temperature == 0.0  # prunes nothing
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        ts.calibrate_temperature(model, _pairs(), macs_budget=1.5)
    plain = host_model("timm-vit")
    ts.patch(plain, ts.EViT(layers=(1,)))
    with pytest.raises(ValueError, match="sets MADTP's T"):
        ts.calibrate_temperature(plain, images(2), macs_budget=0.5)


def test_without_alignment_guidance_importance_is_the_attention_terms_and_nothing_is_aligned():
    model = strengthen(host_model("timm-vit"))
    x = images(2)
    reports = {}
    for aligned in (True, False):
        torch.manual_seed(0)
        ts.patch(model, ts.MADTP(temperature=8.0, layers=(LAYER,), aligned=aligned))
        with torch.no_grad(), ts.trace(model) as traces:
            model(x)
        reports[aligned] = traces[0].reports[IMPORTANCE_REPORT][0].importance
    # aligned: (received + best + class) / 3; not: (received + class) / 2; so the best-match term is
    best = 3 * reports[True] - 2 * reports[False]  # divided by its sum: it sums to 1
    torch.testing.assert_close(best.sum(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    model.train()
    with ts.trace(model) as traces:
        model(x)
    assert POOLED_REPORT not in traces[0].reports


def test_the_attention_map_is_computed_once_and_read_by_the_method():
    model = strengthen(host_model("timm-vit"))
    x = images(2)
    torch.manual_seed(0)
    ts.patch(model, ts.MADTP(temperature=8.0, layers=(LAYER,)))
    report = ts.flops(model, x)
    assert "importance" not in report.overhead  # the block's own map, not a second one
    torch.manual_seed(0)
    ts.patch(model, ts.MADTP(temperature=8.0, layers=(LAYER,)), attention="eager")
    assert ts.flops(model, x).macs == report.macs


@pytest.mark.parametrize("lengths", [[4, 12, 12], [12, 12, 4]], ids=["short-first", "short-last"])
def test_the_batch_count_on_padded_text_is_the_batchs_largest_and_never_keeps_padding(lengths):
    model = _towers(batch_max=True)[0]
    ids, mask = texts(lengths)
    with torch.no_grad(), ts.trace(model.text_encoder) as traces:
        model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=torch.zeros(3, 17, 48))
    for stage, record in zip(traces[0].reports[IMPORTANCE_REPORT], traces[0].layers, strict=True):
        available = torch.tensor(lengths) - 1 if stage.layer == 0 else None
        if available is not None:
            largest = int((stage.importance > stage.threshold[:, None]).sum(dim=1).max())
            expected = torch.minimum(torch.full((3,), largest), available)
            expected = torch.where(available - expected < 2, available, expected)
            assert torch.equal(stage.kept, expected)
        real = record.index[record.valid] if record.valid is not None else record.index.flatten()
        assert bool((record.valid.sum(dim=1) <= torch.tensor(lengths)).all())  # no padding became a token
        assert bool((real < max(lengths)).all())
    short = lengths.index(4)
    assert bool((traces[0].layers[-1].index[short][traces[0].layers[-1].valid[short]] < 4).all())


def test_a_sample_with_no_token_above_its_threshold_keeps_every_token(monkeypatch):
    model = strengthen(host_model("timm-vit"))
    torch.manual_seed(0)
    ts.patch(model, ts.MADTP(temperature=8.0, layers=(LAYER,)))

    def at_the_top(scores, importance, temperature, valid):  # none is rated above it
        return importance.amax(dim=1)

    monkeypatch.setattr(madtp, "alignment_threshold", at_the_top)
    with torch.no_grad(), ts.trace(model) as traces:
        model(images(2))
    stage = traces[0].reports[IMPORTANCE_REPORT][0]
    assert stage.kept.tolist() == [64, 64] and traces[0].kept_tokens()[LAYER].tolist() == [65, 65]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_outputs_finite_and_the_temperature_in_float64(dtype):
    model, sieve = _towers(temperature=3.0)
    ids, mask = texts([5, 9, 12])
    pixels = distinct_images()[:, :, :32, :32]
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).itm_score
    assert torch.isfinite(out).all()
    sieve.to(dtype)
    assert sieve.shared["bank"].temperature.dtype == torch.float64
    assert float(sieve.shared["bank"].temperature) == 3.0


def test_blips_own_forward_cross_attends_only_what_the_image_tower_patched_with_it_kept():
    model, _ = _towers()
    ids, mask = texts([5, 9, 12])
    pixels = distinct_images()[:, :, :32, :32]
    with torch.no_grad(), ts.trace(model.vision_model) as image:
        batch = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).itm_score
    assert len(set(image[0].output_mask().sum(dim=1).tolist())) > 1  # a ragged image batch
    for i, length in enumerate([5, 9, 12]):
        with torch.no_grad():
            alone = model(input_ids=ids[i : i + 1, :length], pixel_values=pixels[i : i + 1]).itm_score
        torch.testing.assert_close(batch[i], alone[0], atol=TOLERANCE, rtol=0)


def test_a_view_of_attention_run_per_sample_refuses_what_it_did_not_keep():
    from tokensieve.methods import AttentionView
    from tokensieve.tokens import TokenState

    state = TokenState.start(torch.randn(2, 5, 8), 1)
    view = AttentionView(None, None, None, 0.5, state, heads_out=torch.randn(2, 5, 8), heads=2)
    assert view.head_count == 2
    for read in (view.class_attention, view.received_attention, view.key_metric):
        with pytest.raises(ValueError, match="attended per sample"):
            read()
